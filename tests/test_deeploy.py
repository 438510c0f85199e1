"""Deeploy (the ``deeploy-pulp`` 0.2.1 wheel from PyPI, Generic platform) parses, maps and generates C for
labkit's Deeploy export of PACT 8/8, TQT 8/8, PACT 4/4 and mixed-precision networks (int32 twins with shift
groups and pre-clips), and refuses the standard export; the generated C, built with gcc against Deeploy's
Generic kernel library, reproduces every logit of ``outputs.npz``. Deeploy runs in its own cached virtual
environment (deeploy_env.py; made on first use, ~2 min); its C library is built from a clone of Deeploy's
repository that ``$LABKIT_DEEPLOY_GIT`` names (deeploy_c.py; the gcc test is skipped without one)."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from labkit.export import export
from labkit.integer import int32_twin, integerize

from deeploy_c import SourceMissing, generic_library, run_generated_c
from deeploy_env import run_codegen
from test_integerize import SHAPE, digits, eps_in_for, started_net

pytestmark = pytest.mark.slow

#: the operators Deeploy's Generic lowering leaves for a labkit network (pads become Pad nodes; Mul:
# pre-clips)
GENERIC_OPS = {"Add", "Conv", "Flatten", "Gemm", "Mul", "Pad", "RequantShift"}
#: the embedded mixed-precision config: 8-bit first and last layer, everything else 4 bit
MIXED = {"pilot.0": 8, "classifier.1": 8, "avgpool_act": 8}
NETS = {"pact8": dict(), "tqt8": dict(tqt=True), "pact4": dict(w_bits=4, a_bits=4),
        "mixed": dict(w_bits=4, a_bits=4, overrides=MIXED)}


@pytest.fixture(scope="module", params=list(NETS))
def generated(request, tmp_path_factory):
    """``(name, int32 twin, plan, export folder, ONNX model, Deeploy's summary, work folder)`` per network: 4
    validation images, the network's batch 2 (the golden data holds two runs)."""
    qnet = started_net(**NETS[request.param])
    inet32, plan = int32_twin(integerize(qnet, eps_in_for(), SHAPE))
    work = tmp_path_factory.mktemp(request.param)
    paths = export(inet32, work / "export", digits(4), target="deeploy", batch=2)
    done = run_codegen(work / "export", work / "c")
    assert done.returncode == 0, done.stderr[-3000:]
    return (request.param, inet32, plan, work / "export", onnx.load(str(paths["network"])),
            json.loads(done.stdout.strip().splitlines()[-1]), work)


def test_deeploy_generates_c_for_the_deeploy_export(generated):
    name, inet32, plan, _, model, summary, work = generated
    ops = Counter(n.op_type for n in model.graph.node)
    adders = sum(r["layer"].endswith(".act_out") for r in plan.layers)
    # every requantization's nodes as the plan counts them, and one Add per adder
    assert ops["RequantShift"] + ops["Mul"] + ops["Add"] == sum(r["nodes"] for r in plan.layers) + adders
    assert ops["Mul"] == sum(len(r["preclip"].split("+")) for r in plan.layers if r["preclip"])
    assert set(summary["ops"]) <= GENERIC_OPS and {"Add", "Conv", "Gemm",
                                                   "RequantShift"} <= set(summary["ops"])
    assert all(summary["ops"].get(op, 0) == ops[op] for op in ("RequantShift", "Mul", "Add", "Conv", "Gemm"))
    assert summary["input_type"] == "int8_t" and summary["output_type"] == "int32_t"
    kernels = summary["kernels"]
    assert sum(v for k, v in kernels.items() if k.startswith("RequantShift_")) == ops["RequantShift"]
    assert kernels["Gemm_s8_s8_s32_s32"] == 1
    c = (work / "c" / "Network.c").read_text()
    assert "void RunNetwork(" in c and "void InitNetwork(" in c and summary["c_lines"] > 1000
    if name == "pact8":  # the 8/8 nets need the pre-clip and the groups somewhere
        assert ops["Mul"] > 0 and any(r["groups"] > 1 for r in plan.layers)


def test_deeploy_c_reproduces_the_golden_logits(generated):
    """Deeploy's generated C, compiled with gcc against its Generic kernels (the flags of its CMake), run on
    both batches of the golden inputs: every logit equal to ``outputs.npz`` (the int32 twin's)."""
    name, inet32, _, folder, _, _, work = generated
    try:
        generic_library()
    except SourceMissing as missing:
        pytest.skip(str(missing))
    logits = run_generated_c(folder, work / "c")
    expected = np.load(folder / "outputs.npz")["output"]
    assert logits.shape == expected.shape == (4, 10) and np.array_equal(logits, expected), name


def test_deeploy_refuses_the_standard_export(pact8, tmp_path):
    """The test can fail: the standard export (symbolic batch, Cast nodes) does not go through Deeploy."""
    folder = tmp_path / "export"
    export(pact8[1], folder, digits(2))
    done = run_codegen(folder, tmp_path / "c")
    assert done.returncode != 0 and not (tmp_path / "c" / "Network.c").exists()
    assert "Traceback" in done.stderr
