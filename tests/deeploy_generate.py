"""Deeploy's own ``DeeployTest/generateNetwork.py`` in Deeploy's environment, without one pass:

    python deeploy_generate.py --no-emulation DEEPLOY_TEST_DIR/generateNetwork.py ARGS...

runs the script (``runpy``, as ``python generateNetwork.py ARGS``) with ``EmulateCMSISRequantPass``, which
generateNetwork.py v0.2.1 inserts first in the lowering of every non-CMSIS platform (lines 136-139), replaced
by a pass that leaves the graph as it is, in this process only (Deeploy's files are not touched). Without the
option the script runs unmodified.
"""

import os
import runpy
import sys


class _Identity:
    """A lowering pass that leaves the graph unchanged (stands in for EmulateCMSISRequantPass)."""

    def apply(self, graph):
        return graph


def main(argv):
    rest = [a for a in argv if a != "--no-emulation"]
    script = os.path.abspath(rest[0])
    if "--no-emulation" in argv:
        from Deeploy.CommonExtensions.OptimizationPasses.TopologyOptimizationPasses import (  # noqa: PLC0415
            DebugPasses,
        )

        DebugPasses.EmulateCMSISRequantPass = _Identity  # generateNetwork.py imports the name from here
    sys.argv = [script, *rest[1:]]
    sys.path.insert(0, os.path.dirname(script))  # its testUtils package
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
