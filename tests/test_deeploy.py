"""Deeploy (the ``deeploy-pulp`` 0.2.1 wheel from PyPI, Generic platform) parses, maps and generates C for labkit's
Deeploy export, and refuses the standard one. Deeploy runs in its own cached virtual environment
(deeploy_env.py; made on first use, ~2 min). Deeploy's C kernel library is not in the wheel and is not built here:
docs/export.md records the gcc run of the generated C against every logit."""

import json

import onnx
import pytest

from labkit.export import export
from labkit.integer import int32_twin, integerize, requant_layers

from deeploy_env import run_codegen
from test_integerize import SHAPE, digits, eps_in_for, started_net

pytestmark = pytest.mark.slow

#: the operators Deeploy's Generic lowering leaves for a labkit network (pads become Pad nodes)
GENERIC_OPS = {"Add", "Conv", "Flatten", "Gemm", "Pad", "RequantShift"}


def generate(inet32, tmp_path):
    folder = tmp_path / "export"
    paths = export(inet32, folder, digits(2), target="deeploy")
    done = run_codegen(folder, tmp_path / "c")
    assert done.returncode == 0, done.stderr[-3000:]
    return onnx.load(str(paths["network"])), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits", [8, 4])
def test_deeploy_generates_c_for_the_deeploy_export(bits, pact8, tmp_path, one_thread):
    if bits == 8:
        inet = pact8[1]
    else:  # TQT 4/4 with power-of-two scales: 16-level codes, pure-shift requantizations
        qnet = started_net(w_bits=4, a_bits=4, tqt=True, pow2=True, seed=1)
        inet = integerize(qnet, eps_in_for(bits=8, pow2=True), SHAPE)
    inet32, _ = int32_twin(inet)
    model, summary = generate(inet32, tmp_path)
    n_requant = len(requant_layers(inet32))
    assert set(summary["ops"]) == GENERIC_OPS and summary["ops"]["RequantShift"] == n_requant
    assert summary["ops"]["Gemm"] == 1 and summary["ops"]["Conv"] == sum(n.op_type == "Conv" for n in model.graph.node)
    assert summary["input_type"] == "int8_t" and summary["output_type"] == "int32_t"
    kernels = summary["kernels"]
    assert sum(v for k, v in kernels.items() if k.startswith("RequantShift_")) == n_requant
    assert kernels["Gemm_s8_s8_s32_s32"] == 1
    c = (tmp_path / "c" / "Network.c").read_text()
    assert "void RunNetwork(" in c and "void InitNetwork(" in c and summary["c_lines"] > 1000


def test_deeploy_refuses_the_standard_export(pact8, tmp_path):
    """The test can fail: the standard export (symbolic batch, Cast nodes) does not go through Deeploy."""
    folder = tmp_path / "export"
    export(pact8[1], folder, digits(2))
    done = run_codegen(folder, tmp_path / "c")
    assert done.returncode != 0 and not (tmp_path / "c" / "Network.c").exists()
    assert "Traceback" in done.stderr
