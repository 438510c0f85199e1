"""Export: network.onnx passes the ONNX checker and onnxruntime reproduces outputs.npz exactly, for every
target (standard, qonnx, Deeploy: its RequantShift nodes checked in Deeploy's semantics)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from labkit.export import CUSTOM_DOMAIN, ExportError, check_export, export, finn_type, to_onnx
from labkit.export.deeploy import KEEP_ADD
from labkit.integer import int32_twin, integerize, requant_layers

from helpers import intra_op_threads
from test_integerize import SHAPE, digits, eps_in_for, started_net


@pytest.fixture(scope="module")
def nets(pact8):
    with intra_op_threads(1):
        tqt = started_net(w_bits=4, a_bits=4, tqt=True, pow2=True, seed=1)
        inet = pact8[1]
        # pact32: the plain int32 twin, one RequantShift per requantization (test_int32 and test_deeploy check
        # the default twin's shift groups and pre-clips)
        yield {"pact": inet, "tqt_pow2": integerize(tqt, eps_in_for(bits=8, pow2=True), SHAPE),
               "pact32": int32_twin(inet, max_groups=1, preclip=False, flat=False)[0]}


@pytest.mark.parametrize("name", ["pact", "tqt_pow2"])
def test_onnxruntime_reproduces_outputs_exactly(nets, name, tmp_path):
    inet = nets[name]
    paths = export(inet, tmp_path, digits(6), activations=True)
    model = onnx.load(str(paths["network"]))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Gemm", "Mul", "Add", "Div", "Floor", "Clip", "ReduceSum"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    # integer-valued weights
    for init in model.graph.initializer:
        if "_weight_" in init.name:
            w = onnx.numpy_helper.to_array(init)
            assert np.array_equal(w, np.round(w)), init.name
    result = check_export(tmp_path)
    assert result["exact"] and result["max_abs_diff"] == 0 and result["samples"] == 6
    # the default graph optimizations of onnxruntime keep the numbers too
    session = ort.InferenceSession(str(paths["network"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": np.load(paths["inputs"])["input"]})[0]
    expected = np.load(paths["outputs"])["output"]
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(meta["eps_in"]) == pytest.approx(inet.eps_in) and json.loads(meta["input_codes"]) == [-128,
                                                                                                       127]
    with np.load(paths["activations"]) as acts:
        layers = dict(requant_layers(inet))
        assert "pilot.2" in acts and "classifier.1" in acts and "input_quant" in acts
        assert acts["pilot.2"].dtype == np.uint8 and acts["pilot.2"].max() <= layers["pilot.2"].hi
        assert np.array_equal(acts["classifier.1"].astype(np.int64), expected)


def test_pure_shifts_have_no_multiplier(nets):
    inet = nets["tqt_pow2"]
    model = to_onnx(inet)
    pool = [n for n in model.graph.node if n.name.startswith("avgpool_act")]
    assert pool
    assert dict(requant_layers(inet))["avgpool_act"].shift is not None
    assert [n.op_type for n in pool if n.op_type != "Cast"] == [op for op in ("Add", "Div", "Floor", "Clip")
                                                                if any(n.op_type == op for n in pool)]
    assert not any(n.op_type == "Mul" for n in pool)


def static_graph(net, tmp_path, n: int, target: str):
    """Export ``n`` digits for ``target``: the paths and the graph, checked for the static batch ``n`` and a
    shape on every tensor."""
    paths = export(net, tmp_path, digits(n), target=target)
    g = onnx.load(str(paths["network"])).graph
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == [n, 3, 32, 32]
    assert {o for node in g.node for o in node.output} - {"output"} <= {v.name for v in g.value_info}
    return paths, g


def test_deeploy_export_is_what_deeploy_reads_and_onnxruntime_reproduces_it(nets, tmp_path):
    """Static batch, a shape for every tensor, no Cast/Identity, RequantShift with float32 tensor attributes
    and Deeploy's add (its kernel adds the half-step), pool as a depthwise conv of ones, Gemm with alpha/beta;
    the graph, with RequantShift in Deeploy's semantics, reproduces the int32 twin's logits in onnxruntime."""
    inet32 = nets["pact32"]
    paths, g = static_graph(inet32, tmp_path, 3, "deeploy")
    assert {o for n in g.node for o in n.output} - {"output"} == {v.name for v in g.value_info}
    assert all(d.dim_value > 0 for v in g.value_info for d in v.type.tensor_type.shape.dim)
    assert {n.op_type for n in g.node} == {"Conv", "RequantShift", "Add", "Flatten", "Gemm"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    rs = [n for n in g.node if n.op_type == "RequantShift"]
    assert len(rs) == len(requant_layers(inet32)) and all(n.domain == CUSTOM_DOMAIN for n in rs)
    for node, (name, req) in zip(rs, requant_layers(inet32)):
        attrs = {a.name: a for a in node.attribute}
        assert all(a.type == onnx.AttributeProto.TENSOR for a in attrs.values())
        values = {k: onnx.numpy_helper.to_array(a.t).reshape(-1)[0] for k, a in attrs.items()}
        assert values == {"div": 2.0 ** req.d, "n_levels_out": req.n_levels, "signed": int(req.signed),
                          KEEP_ADD: 1}  # Deeploy's Generic flow keeps the add as written
        mul, add = (inits[i] for i in node.input[1:])
        assert mul.dtype == add.dtype == np.int32
        assert np.array_equal(mul.reshape(-1), req.mul.reshape(-1).numpy())
        half = (1 << (req.d - 1)) if req.d else 0
        assert np.array_equal(add.reshape(-1).astype(np.int64), req.add.reshape(-1).numpy() - half), name
    pool = next(n for n in g.node if n.name.startswith("avgpool_Conv"))
    assert np.all(inits[pool.input[1]] == 1) and inits[pool.input[1]].shape[1] == 1
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute} == \
        {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}
    assert gemm.output[0] == "output" and len(gemm.input) == 3
    result = check_export(tmp_path)
    assert result["exact"] and result["samples"] == 3 and result["target"] == "deeploy"
    assert np.array_equal(np.load(paths["outputs"])["output"], inet32(digits(3)).numpy())


def test_deeploy_check_fails_with_labkits_add(nets, tmp_path):
    """The onnxruntime check of a Deeploy export computes Deeploy's semantics: labkit's add convention (the
    half-step inside add, which Deeploy's kernel adds again) is caught."""
    inet32 = nets["pact32"]
    paths = export(inet32, tmp_path, digits(3), target="deeploy")
    model = onnx.load(str(paths["network"]))
    inits = {i.name: i for i in model.graph.initializer}
    for node, (_, req) in zip([n for n in model.graph.node if n.op_type == "RequantShift"],
                              requant_layers(inet32)):
        add = inits[node.input[2]]
        add.CopyFrom(onnx.numpy_helper.from_array(req.add.numpy().reshape(
            onnx.numpy_helper.to_array(add).shape).astype(np.int32), add.name))
    onnx.save(model, str(paths["network"]))
    result = check_export(tmp_path)
    assert not result["exact"] and result["max_abs_diff"] > 0


def test_deeploy_export_needs_the_int32_twin(nets, tmp_path):
    with pytest.raises(ExportError, match="int32_twin"):
        export(nets["pact"], tmp_path, digits(2), target="deeploy")
    with pytest.raises(ExportError, match="unknown target 'tflite'"):
        to_onnx(nets["pact"], target="tflite")


def test_qonnx_target_static_batch_shapes_and_datatypes(nets, tmp_path):
    inet = nets["tqt_pow2"]
    _, g = static_graph(inet, tmp_path, 2, "qonnx")
    types = {a.tensor_name: {e.key: e.value for e in a.quant_parameter_tensor_names}["finn_datatype"]
             for a in g.quantization_annotation}
    assert types["input"] == "INT8"
    clips = {n.output[0] for n in g.node if n.op_type == "Clip"}
    codes = [types[n.output[0]] for n in g.node if n.op_type == "Cast" and n.input[0] in clips]
    assert codes == [finn_type(r.lo, r.hi) for _, r in requant_layers(inet)]
    assert {"UINT4", "INT4"} <= set(codes)
    assert {types[n.output[0]] for n in g.node if n.op_type in ("Conv", "Gemm", "ReduceSum")} == {"INT32"}
    assert {types[n.input[1]] for n in g.node if n.op_type == "Conv"} == {"INT4"}
    assert check_export(tmp_path)["exact"]


@pytest.mark.slow
def test_qonnx_executes_the_export_exactly_and_sees_integer_types(nets, tmp_path):
    """qonnx 1.0.0's own executor runs the qonnx target as written (no transformation first) and reproduces
    outputs.npz; its InferDataTypes sees INT8/UINT8 codes and INT32 accumulators (~1.5 min: node by node)."""
    import warnings
    from collections import Counter

    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_datatypes import InferDataTypes

    paths = export(nets["pact"], tmp_path, digits(3), target="qonnx")
    model = ModelWrapper(str(paths["network"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # qonnx warns when a value contradicts its annotated datatype
        got = execute_onnx(model, {"input": np.load(paths["inputs"])["input"]})["output"]
    assert got.dtype == np.int64 and np.array_equal(got, np.load(paths["outputs"])["output"])
    typed = model.transform(InferDataTypes())
    by_op = Counter((n.op_type,
                     typed.get_tensor_datatype(n.output[0]).get_canonical_name()) for n in typed.graph.node)
    n_requant = len(requant_layers(nets["pact"]))
    assert by_op[("Conv", "INT32")] == 52 and by_op[("Gemm", "INT32")] == 1 and by_op[("Add", "INT32")] == 11
    assert by_op[("Cast", "UINT8")] + by_op[("Cast", "INT8")] >= n_requant
    assert typed.get_tensor_datatype("input").get_canonical_name() == "INT8"


def test_cli_export_refuses_calibration_outside_the_deeploy_target(tmp_path, capsys):
    from labkit.cli import main

    (tmp_path / "run").mkdir()  # the run is checked first; the calibration is then refused before it loads
    assert main(["export", str(tmp_path / "run"), "--target", "qonnx", "--calibrate", "64", "-o",
                 str(tmp_path / "out")]) == 2
    assert (
        "--calibrate sets the int32 shifts of --target deeploy only, not of qonnx" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--target", "tflite"])
