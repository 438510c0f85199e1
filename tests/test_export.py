"""Export: network.onnx passes the ONNX checker, onnxruntime reproduces outputs.npz exactly; RequantShift variant."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from labkit.export import CUSTOM_DOMAIN, check_export, export, to_onnx
from labkit.integer import integerize, requant_layers
from test_integerize import SHAPE, digits, eps_in_for, started_net


@pytest.fixture(scope="module")
def nets():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pact = started_net()
        tqt = started_net(w_bits=4, a_bits=4, tqt=True, pow2=True, seed=1)
        yield {"pact": integerize(pact, eps_in_for(), SHAPE),
               "tqt_pow2": integerize(tqt, eps_in_for(bits=8, pow2=True), SHAPE)}
    finally:
        torch.set_num_threads(n)


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
    assert float(meta["eps_in"]) == pytest.approx(inet.eps_in) and json.loads(meta["input_codes"]) == [-128, 127]
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


def test_requant_shift_nodes_for_deeploy(nets, tmp_path):
    inet = nets["pact"]
    paths = export(inet, tmp_path, digits(2), requant_shift=True)
    model = onnx.load(str(paths["network"]))
    onnx.checker.check_model(model)
    rs = [n for n in model.graph.node if n.op_type == "RequantShift"]
    assert len(rs) == len(requant_layers(inet))
    assert all(n.domain == CUSTOM_DOMAIN for n in rs)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in rs[0].attribute}
    first = requant_layers(inet)[0][1]
    assert attrs == {"div": first.div, "n_levels_out": first.n_levels, "signed": int(first.signed)}
    assert not any(n.op_type in ("Floor", "Div") for n in model.graph.node)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node, (_, req) in zip(rs, requant_layers(inet)):  # the integers exactly, not rounded to float32
        mul, add = (inits[name] for name in node.input[1:])
        assert mul.dtype == add.dtype == np.int64
        assert np.array_equal(mul.reshape(-1), req.mul.reshape(-1).numpy())
        assert np.array_equal(add.reshape(-1), req.add.reshape(-1).numpy())
    with pytest.raises(Exception, match="RequantShift"):
        check_export(tmp_path)
