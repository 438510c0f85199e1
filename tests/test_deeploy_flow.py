"""Deeploy v0.2.1's own test flow (generateNetwork.py unmodified, its CMake project and harness;
deeploy_flow.py) on labkit's Deeploy export, every logit checked against a model of what Deeploy computes:

* Generic, as released: ``outputs.npz`` itself. ``EmulateCMSISRequantPass`` would rewrite each RequantShift's
  ``add`` to ``round(add / (mul + 1e-3)) * mul`` (a whole number of ``mul``: the bias enters before the
  multiply, as in CMSIS-NN); the export's ``Emulate_CMSIS_RequantShift`` attribute makes the pass leave it;
* Generic without that pass: ``outputs.npz`` too;
* the CMSIS platform under qemu-system-arm, Deeploy unmodified, on the Generic export rewritten by
  deeploy_graphs.for_cmsis: the model above (``add`` rounded to a whole number of ``mul``), which CMSIS-NN's
  kernels compute whatever the attribute says;
* the CMSIS platform on the ``deeploy-cmsis`` export (the CMSIS twin in the graph that platform maps):
  ``outputs.npz`` itself.

Needs Deeploy's source (deeploy_env.source_dir: ``$LABKIT_DEEPLOY_GIT``, ``$LABKIT_CMSIS_NN_GIT``), cmake,
ccache and gcc, and for the CMSIS test Debian's gcc-arm-none-eabi, picolibc-arm-none-eabi and qemu-system-arm;
skipped with the reason where one is missing."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh

from labkit.export import export
from labkit.export.deeploy import as_standard
from labkit.integer import cmsis_twin, int32_twin

from deeploy_env import ToolMissing
from deeploy_flow import compare_chunked
from test_integerize import digits

pytestmark = pytest.mark.slow


def emulate_cmsis_requant(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each RequantShift's ``add`` as EmulateCMSISRequantPass leaves it (DebugPasses.py v0.2.1,
    40-41):
    ``round(add / (mul + 1e-3)) * mul``, in float64 as numpy computes it there."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "RequantShift":
            mul, add = (nh.to_array(inits[name]).astype(np.float64) for name in node.input[1:3])
            new = np.round(add / (mul + 1e-3)) * mul
            inits[node.input[2]].CopyFrom(nh.from_array(new.astype(np.int32), node.input[2]))
    return model


def logits(model: onnx.ModelProto, export_dir: Path) -> np.ndarray:
    """The Deeploy export's logits by onnxruntime, RequantShift in Deeploy's semantics (export.deeploy)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        as_standard(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    with np.load(export_dir / "inputs.npz") as z:
        return session.run(["output"], {"input": z["input"]})[0].astype(np.int64)


def run(folder: Path, flow: str, chunk=None) -> dict:
    try:
        result = compare_chunked(folder, flow, chunk)
    except ToolMissing as e:
        pytest.skip(str(e))
    assert result["completed"], result
    assert result["golden_is_outputs_npz"] and result["reported_total"] >= result["logits"]
    return result


@pytest.fixture(scope="module")
def exported(pact8, tmp_path_factory):
    """The pact8 net's Deeploy export of 4 validation digits (the default int32 twin: shift groups,
    pre-clips)."""
    folder = tmp_path_factory.mktemp("deeploy-flow") / "pact8"
    export(int32_twin(pact8[1])[0], folder, digits(4), target="deeploy")
    return folder


@pytest.fixture(scope="module")
def exported_plain(pact8, tmp_path_factory):
    """The same with one RequantShift per requantization (``max_groups=1``, no pre-clip: every Conv followed
    by its RequantShift, the pattern CMSIS's requantized-conv mapping matches), and its logits under the
    bias-first model (add rounded to a whole number of mul, as EmulateCMSISRequantPass and CMSIS-NN do)."""
    folder = tmp_path_factory.mktemp("deeploy-flow") / "pact8-plain"
    export(int32_twin(pact8[1], max_groups=1, preclip=False)[0], folder, digits(4), target="deeploy")
    model = onnx.load(str(folder / "network.onnx"))
    return folder, logits(emulate_cmsis_requant(model), folder)


@pytest.fixture(scope="module")
def exported_cmsis(pact8, tmp_path_factory):
    """The pact8 net's ``deeploy-cmsis`` export of 4 validation digits (the CMSIS twin)."""
    folder = tmp_path_factory.mktemp("deeploy-flow") / "pact8-cmsis"
    export(cmsis_twin(pact8[1])[0], folder, digits(4), target="deeploy-cmsis")
    return folder


def test_cmsis_flow_as_released_reproduces_the_cmsis_export(exported_cmsis, one_thread):
    """Deeploy's CMSIS platform, unmodified, under qemu: every logit of the CMSIS twin (runs of 2 samples)."""
    result = run(exported_cmsis, "cmsis", chunk=2)
    assert result["chunks"] == 2 and result["logits"] == 40
    assert result["differing"] == 0 and result["reported_errors"] == 0 and result["max_abs_diff"] == 0


def test_generic_flow_as_released_is_exact(exported, one_thread):
    result = run(exported, "generic")
    assert result["differing"] == 0 and result["reported_errors"] == 0 and result["max_abs_diff"] == 0


def test_generic_flow_without_the_emulation_pass_is_exact(exported, one_thread):
    result = run(exported, "generic-no-emulation")
    assert result["differing"] == 0 and result["reported_errors"] == 0 and result["max_abs_diff"] == 0


def test_cmsis_flow_under_qemu_equals_the_bias_first_model(exported_plain, one_thread):
    folder, emulated = exported_plain
    result = run(folder, "cmsis-rewritten", chunk=2)
    assert result["chunks"] == 2
    assert np.array_equal(np.array(result["logits_seen"]), emulated)


@pytest.mark.parametrize("form, op", [("default", "Conv"), ("plain", "Gemm")])
def test_cmsis_flow_as_released_cannot_map_the_export(exported, exported_plain, form, op, one_thread):
    """Deeploy's CMSIS platform maps a Conv only when a RequantShift follows it (a pre-clip puts Mul/Add
    between them) and has no Gemm: either export stops at code generation (docs/export.md)."""
    folder = exported if form == "default" else exported_plain[0]
    try:
        result = compare_chunked(folder, "cmsis")
    except ToolMissing as e:
        pytest.skip(str(e))
    assert not result["completed"] and result["stage"] == "generate"
    unmapped = [line for line in result["error"] if "No mapping found" in line]
    assert any(f"op type {op}" in line for line in unmapped), result["error"]
