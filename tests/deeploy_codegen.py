"""Deeploy's Generic platform (the ``deeploy-pulp`` wheel) on a labkit Deeploy export: parse, map, generate C.

Runs in Deeploy's own virtual environment (``deeploy_env.deeploy_python()`` makes it), not in labkit's:

    python deeploy_codegen.py EXPORT_DIR OUT_DIR

Writes ``OUT_DIR/Network.h`` and ``OUT_DIR/Network.c`` (``InitNetwork``/``RunNetwork`` calling Deeploy's
Generic kernel library, which the wheel does not ship) and prints one JSON line: the operators after Deeploy's
lowering, the C types of the network input and output, the input's length, and the kernel calls in
``Network.c``.
"""

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from Deeploy.AbstractDataTypes import PointerClass
from Deeploy.CommonExtensions.DataTypes import int8_t
from Deeploy.DeeployTypes import _NoVerbosity
from Deeploy.Targets.Generic.Deployer import GenericDeployer
from Deeploy.Targets.Generic.Platform import GenericOptimizer, GenericPlatform

SIGNATURES = "uint32_t core_id, uint32_t numThreads"


def generate(export_dir: Path, out_dir: Path) -> dict:
    model = onnx.load(str(export_dir / "network.onnx"))
    lo, hi = json.loads({p.key: p.value for p in model.metadata_props}["input_codes"])
    if not -128 <= lo <= hi <= 127:
        raise SystemExit(f"input codes {lo}..{hi} do not fit int8_t")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Deeploy names the graph input input_0; labkit's input codes are signed (offset 0)
    deployer = GenericDeployer(gs.import_onnx(model), GenericPlatform(), {"input_0": PointerClass(int8_t)},
                               GenericOptimizer, lambda graph: graph.nodes, default_channels_first=True,
                               deeployStateDir=str(out_dir / "deeploy_state"), inputOffsets={"input_0": 0})
    deployer.prepare(_NoVerbosity)
    header = "\n".join([
        "#ifndef LABKIT_DEEPLOY_NETWORK_H", "#define LABKIT_DEEPLOY_NETWORK_H", "#include <stdint.h>",
        "#include <stdio.h>", "#include <stdlib.h>", deployer.generateIncludeString(),
        f"void InitNetwork({SIGNATURES});", f"void RunNetwork({SIGNATURES});",
        deployer.generateIOBufferInitializationCode(), "#endif", ""])
    source = "\n".join([
        "#include <math.h>", '#include "Network.h"', deployer.generateBufferInitializationCode(),
        deployer.generateGlobalDefinitionCode(),
        f"void RunNetwork({SIGNATURES}) {{", deployer.generateInferenceInitializationCode(),
        deployer.generateFunction(_NoVerbosity), "}",
        f"void InitNetwork({SIGNATURES}) {{", deployer.generateEngineInitializationCode(),
        deployer.generateBufferAllocationCode(), "}", ""])
    (out_dir / "Network.h").write_text(header)
    (out_dir / "Network.c").write_text(source)
    kernels = Counter(re.findall(r"^\s*([A-Za-z]\w*_s\d+\w*)\(", source, re.M))
    return {"ops": dict(Counter(n.op for n in deployer.graph.nodes)),
            "input_type": deployer.ctxt.lookup("input_0")._type.referencedType.typeName,
            "output_type": deployer.ctxt.lookup("output_0")._type.referencedType.typeName,
            "input_len": int(np.prod(deployer.ctxt.lookup("input_0").shape)),
            "kernels": dict(kernels), "c_lines": source.count("\n")}


if __name__ == "__main__":
    print(json.dumps(generate(Path(sys.argv[1]), Path(sys.argv[2]))))
