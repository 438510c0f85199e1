"""Deeploy's own ``DeeployTest/generateNetwork.py``, run in Deeploy's environment, as is or with one named
change:

    python deeploy_generate.py [--no-emulation] [--cmsis-dw-fix] DEEPLOY_TEST_DIR/generateNetwork.py ARGS...

Without options the script runs unmodified (``runpy``, as ``python generateNetwork.py ARGS``). Each option
changes one thing, in this process only (Deeploy's files are not touched):

``--no-emulation``
    ``EmulateCMSISRequantPass`` (which generateNetwork.py v0.2.1 inserts first in the lowering of every
    non-CMSIS platform, lines 136-139) becomes a pass that leaves the graph as it is.
``--cmsis-dw-fix``
    ``CMSISDWConv2DParser.parseNodeCtxt`` (``Deeploy/Targets/CortexM/Parsers.py`` v0.2.1, lines 61-93) accepts
    the depthwise weights as ``NCHWtoNHWCDwConvPass`` leaves them, ``(1, kh, kw, C)``, the layout CMSIS-NN's
    ``arm_depthwise_conv_wrapper_s8`` reads. As released it requires ``shape[0] == group`` and transposes once
    more, so no depthwise conv of an NCHW graph maps on the CMSIS platform.
"""

import os
import runpy
import sys


class _Identity:
    """A lowering pass that leaves the graph unchanged (stands in for EmulateCMSISRequantPass)."""

    def apply(self, graph):
        return graph


def _dw_parse_node_ctxt(self, ctxt, node, channels_first=True):
    from Deeploy.Targets.Generic.Parsers import RQSConv2DParser  # noqa: PLC0415 - Deeploy's environment only

    ctxt = ctxt.copy()
    new_ctxt, ok = RQSConv2DParser.parseNodeCtxt(self, ctxt, node, channels_first)
    if not ok:
        return ctxt, False
    weight = new_ctxt.lookup(node.inputs[1].name)
    if self.operatorRepresentation["group"] != weight.shape[-1] or not new_ctxt.is_global(weight.name):
        return ctxt, False
    for key, tensor in zip(["data_in", "weight", "mul", "add", "shift"], node.inputs):
        self.operatorRepresentation[key] = new_ctxt.lookup(tensor.name).name
    return new_ctxt, True


def main(argv):
    options = {"--no-emulation", "--cmsis-dw-fix"}
    chosen = [a for a in argv if a in options]
    rest = [a for a in argv if a not in options]
    script = os.path.abspath(rest[0])
    if "--no-emulation" in chosen:
        from Deeploy.CommonExtensions.OptimizationPasses.TopologyOptimizationPasses import (  # noqa: PLC0415
            DebugPasses,
        )

        DebugPasses.EmulateCMSISRequantPass = _Identity  # generateNetwork.py imports the name from here
    if "--cmsis-dw-fix" in chosen:
        from Deeploy.Targets.CortexM import Parsers  # noqa: PLC0415

        Parsers.CMSISDWConv2DParser.parseNodeCtxt = _dw_parse_node_ctxt
    sys.argv = [script, *rest[1:]]
    sys.path.insert(0, os.path.dirname(script))  # its testUtils package
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
