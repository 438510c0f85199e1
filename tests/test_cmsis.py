"""The CMSIS twin and the ``deeploy-cmsis`` export: each merged requantization computes what Deeploy v0.2.1's
CMSIS lowering hands CMSIS-NN (reimplemented here in int64 numpy from their source: the merge pass's
constants, ``arm_nn_requantize``, the output offset and clamp), its bound ``|acc + k| <= 2^31 - 1`` holds on
the proven interval and is refused where it cannot, and the export is the graph the CMSIS platform maps, which
onnxruntime reproduces exactly."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper as nh

from labkit.export import CUSTOM_DOMAIN, ExportError, check_export, export
from labkit.integer import (
    INT32_MAX,
    CmsisRequant,
    IntegerizeError,
    Requant,
    cmsis_requant,
    cmsis_twin,
    compare,
    input_intervals,
    int32_twin,
    requant_layers,
)
from labkit.integer.cmsis_requant import merged_requants

from test_int32 import exact_requant, worst_case_inputs
from test_integerize import digits


def deeploy_merge(mul: np.ndarray, add: np.ndarray, div: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Deeploy v0.2.1 ``Targets/CortexM/TopologyOptimizationPasses/Passes.py`` lines 17-30, as written there:
    ``(bias, multiplier, shift)`` of the merged conv."""
    total = 31 - np.log2(div)
    bias = np.round(add / (mul + 1e-3))
    mult_shift = min(total, np.floor(32 - np.log2(mul.max())))
    return bias, mul * 2 ** mult_shift, int(total - mult_shift)


def arm_nn_requantize(val: np.ndarray, multiplier: np.ndarray, shift: int) -> np.ndarray:
    """CMSIS-NN ``arm_nn_requantize`` (``arm_nnsupportfunctions.h`` 1407-1490, no single rounding) in int64:
    ``doubling_high_mult_no_sat(val << LEFT_SHIFT(shift), multiplier)`` then the divide by
    ``2^RIGHT_SHIFT(shift)`` rounding half away from zero."""
    val, multiplier = val.astype(np.int64), multiplier.astype(np.int64)
    assert np.all(np.abs(multiplier) <= INT32_MAX) and np.all(np.abs(val) <= INT32_MAX)
    left, right = max(shift, 0), max(-shift, 0)
    high = (val * (1 << left) * multiplier + (1 << 30)) >> 31  # (int64) m1 * m2 + 2^30, >> 31
    mask = (1 << right) - 1
    result, threshold = high >> right, (mask >> 1) + (high >> right < 0)
    return result + ((high & mask) > threshold)


def cmsis_nn_conv_output(acc: np.ndarray, mul, add, d: int, n_levels: int, signed: bool) -> np.ndarray:
    """A merged Conv + RequantShift on CMSIS: bias, multiplier and shift from Deeploy's pass, the accumulator
    started at the bias, requantized, ``+ output_offset`` (``-n/2`` for unsigned codes) and clamped to
    ``[-n/2, n/2 - 1]`` (Deeploy's ``ConvTemplate.py`` 36-48); returned as labkit codes."""
    bias, multiplier, shift = deeploy_merge(np.asarray(mul), np.asarray(add), 2.0 ** d)
    assert np.all(multiplier == np.round(multiplier)) and np.all(np.abs(multiplier) <= INT32_MAX)
    out = arm_nn_requantize(acc + bias.astype(np.int64), multiplier.astype(np.int64), shift)
    offset = 0 if signed else -(n_levels // 2)
    return np.clip(out + offset, -(n_levels // 2), n_levels // 2 - 1) - offset


def test_cmsis_requant_is_cmsis_nn_arithmetic():
    """Channels with ratios 0.0007..0.93 output codes per accumulator unit, offsets of either sign: the twin's
    codes are CMSIS-NN's on every interval end, window edge and 20,000 random accumulators per channel."""
    lo, hi = [-1_900_000, -4_000, -300_000, -50, 0], [1_900_000, 4_000, 250_000, 50, 70_000]
    for signed, (c_lo, c_hi) in ((True, (-128, 127)), (False, (0, 255))):
        r = exact_requant([0.0007, 0.93, 0.004, 0.25, 0.0031], [3.3, -40.2, 127.49, 0.5, -80.0], c_lo, c_hi,
                          signed)
        cm, row = cmsis_requant(r, torch.tensor(lo), torch.tensor(hi), name="proj")
        assert isinstance(cm, CmsisRequant) and cm.d == row["d32"] == 31 and row["form"] == "cmsis"
        x = worst_case_inputs(lo, hi)
        mul, add = cm.mul.numpy(), (cm.bias * cm.mul).numpy()  # what the export writes
        want = cmsis_nn_conv_output(x.numpy(), mul, add, cm.d, 256, signed)
        assert np.array_equal(cm(x).numpy(), want)
        # the formula: clip(floor(((acc + k) m + 2^(D-1)) / 2^D)), k = round((add - 2^(d-1)) 2^(D-d) / m)
        k = torch.round((r.add - 2 ** (r.d - 1)).double() * 2.0 ** (cm.d - r.d) / cm.mul.double()).long()
        assert torch.equal(cm.bias, k)
        assert row["bound"] == max(max(abs(a + b), abs(c + b)) for a, c, b in zip(lo, hi, k.tolist()))
        # against the exact requantization: at most the proven error before the floor
        exact = (x * r.mul + r.add).double() / 2.0 ** r.d
        got = ((x + cm.bias) * cm.mul + 2 ** (cm.d - 1)).double() / 2.0 ** cm.d
        inside = (exact >= c_lo) & (exact < c_hi + 1)
        assert float((got - exact).abs()[inside].max()) <= row["error"] + 1e-9
        assert row["error"] <= 0.93 / 2 + 1e-6  # half a step of k: |m| / 2^(D+1) codes


def test_bound_is_proven_and_an_overflow_refused():
    r = exact_requant([0.001], [200.0], -128, 127, True)  # k = 200 / 0.001 = 200,000 accumulator units
    cm, row = cmsis_requant(r, torch.tensor([-1_000_000]), torch.tensor([1_000_000]), name="ok")
    assert row["bound"] == 1_200_000 and row["headroom"] == INT32_MAX - 1_200_000
    with pytest.raises(IntegerizeError, match="CMSIS requantization 'ok' overflows: acc \\+ bias"):
        cm(torch.tensor([[INT32_MAX - 100_000]]))
    with pytest.raises(IntegerizeError, match="'edge' overflows int32: channel 0's accumulator .* plus "
                                              "its bias 2000.. reaches 21475....."):
        cmsis_requant(r, torch.tensor([-5]), torch.tensor([INT32_MAX - 100_000]), name="edge")
    too_big = exact_requant([1.5], [0.0], -128, 127, True)  # mul >= 2^d: no int32 multiplier m 2^(31-D)
    with pytest.raises(IntegerizeError, match="'amp'.*1.5 output codes per accumulator unit.*target deeploy"):
        cmsis_requant(too_big, torch.tensor([-10]), torch.tensor([10]), name="amp")


def test_bias_and_multiplier_survive_deeploys_float_arithmetic():
    """A wide accumulator (+-2^30) at 2^-6 codes per unit: D drops below 31 just enough that float64 stays
    exact ((|acc| + |k|) m < 2^53), and the merge pass gives back exactly k and the int32 multiplier; an
    offset of 300 codes at 2^-16 codes per unit (|k| > 500 m) is refused, as the pass would change k."""
    r = exact_requant([2.0 ** -6], [3.3], -128, 127, True)
    cm, row = cmsis_requant(r, torch.tensor([-(2 ** 30)]), torch.tensor([2 ** 30]), name="wide")
    assert cm.d == 28 and int(cm.bias) == round(3.3 * 64)  # the offset in accumulator units
    bias, multiplier, shift = deeploy_merge(cm.mul.numpy(), (cm.bias * cm.mul).numpy().astype(np.float64),
                                            2.0 ** cm.d)
    assert shift == 0 and np.array_equal(bias, cm.bias.numpy()) and multiplier[0] < 2 ** 31
    assert (2 ** 30 + abs(int(cm.bias))) * int(cm.mul) + 2 ** (cm.d - 1) < 2 ** 53
    x = torch.tensor([[-(2 ** 30)], [2 ** 30], [-9000], [9000], [0]])
    assert np.array_equal(cm(x).numpy(), cmsis_nn_conv_output(x.numpy(), cm.mul.numpy(),
                                                              (cm.bias * cm.mul).numpy(), cm.d, 256, True))
    offset = exact_requant([2.0 ** -16], [300.0], -128, 127, True)
    with pytest.raises(IntegerizeError, match="'far'.*merge pass would not give back its biases"):
        cmsis_requant(offset, torch.tensor([-1000]), torch.tensor([1000]), name="far")


@pytest.fixture(scope="module")
def twin(pact8, one_thread):
    return cmsis_twin(pact8[1])


def test_twin_forms_and_plan(pact8, twin):
    inet, (tw, plan) = pact8[1], twin
    merged = merged_requants(inet)
    assert {r["layer"] for r in plan.layers if r["form"] == "cmsis"} == merged
    assert any(n.endswith(".acts.1") for n in merged) and not any(n.endswith((".acts.0", ".act_out"))
                                                                 for n in merged)
    intervals = input_intervals(inet)
    for (name, r), row in zip(requant_layers(tw), plan.layers):
        assert isinstance(r, CmsisRequant) == (name in merged) and row["layer"] == name
        if name in merged:
            lo, hi = intervals[name]
            assert row["bound"] == int(torch.maximum((lo + r.bias).abs(), (hi + r.bias).abs()).max())
        else:
            assert len(r.groups) == 1 and r.clip is None
    assert plan.worst["headroom"] >= 0
    plan.add_agreement(compare(inet, tw, digits(4)), "4 digits")
    table = plan.table()
    assert "identical_pct" in table.columns and table.columns[1] == "form"
    assert all(90.0 < r["identical_pct"] <= 100.0 for r in plan.layers)


def test_export_is_the_graph_cmsis_maps_and_onnxruntime_reproduces_it(twin, tmp_path):
    tw, _ = twin
    paths = export(tw, tmp_path, digits(3), target="deeploy-cmsis")
    g = onnx.load(str(paths["network"])).graph
    ops = Counter(n.op_type for n in g.node)
    assert set(ops) == {"Add", "Conv", "Flatten", "MatMul", "Pad", "RequantShift", "Transpose"}
    inits = {i.name: nh.to_array(i) for i in g.initializer}
    producer = {n.output[0]: n for n in g.node}
    depthwise = [n for n in g.node if n.op_type == "Conv" and
                 next(a.i for a in n.attribute if a.name == "group") > 1]
    assert ops["Transpose"] == 2 * len(depthwise) and ops["Pad"] == sum(
        producer[producer[n.input[0]].input[0]].op_type == "Pad" for n in depthwise)
    for n in depthwise:  # channels-last between Transposes, unpadded, weights (C, kh, kw, 1)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["channels_first"] == 0 and attrs["pads"] == [0, 0, 0, 0]
        assert producer[n.input[0]].op_type == "Transpose" and inits[n.input[1]].shape[-1] == 1
    cmsis = dict(requant_layers(tw))
    rqs = [n for n in g.node if n.op_type == "RequantShift"]
    assert len(rqs) == len(cmsis) and all(n.domain == CUSTOM_DOMAIN for n in rqs)
    for n in rqs:
        mul, add = inits[n.input[1]].reshape(-1), inits[n.input[2]].reshape(-1)
        div = nh.to_array(next(a.t for a in n.attribute if a.name == "div")).item()
        if producer[n.input[0]].op_type == "Conv":  # merged: add = k mul, Deeploy recovers k and m 2^(31-D)
            bias, multiplier, shift = deeploy_merge(mul, add.astype(np.float64), div)
            assert shift == 0 and np.all(np.abs(multiplier) <= INT32_MAX)
            assert np.array_equal(add, bias.astype(np.int64) * mul)
        else:
            assert add.dtype == np.int32 and mul.dtype == np.int32
    assert sum(producer[n.input[0]].op_type == "Conv" for n in rqs) == len(merged_requants(tw))
    assert ops["MatMul"] == 1 and "Gemm" not in ops and g.node[-1].op_type == "Add"
    assert g.node[-1].output[0] == "output"
    result = check_export(tmp_path)
    assert result["exact"] and result["samples"] == 3 and result["target"] == "deeploy-cmsis"
    assert np.array_equal(np.load(paths["outputs"])["output"], tw(digits(3)).numpy())


def test_the_targets_refuse_each_others_twin(pact8, twin, tmp_path):
    with pytest.raises(ExportError, match="not in the form Deeploy's CMSIS platform computes.*cmsis_twin"):
        export(int32_twin(pact8[1], max_groups=1, preclip=False, flat=False)[0], tmp_path, digits(1),
               target="deeploy-cmsis")
    with pytest.raises(ExportError, match="CMSIS form.*--target deeploy-cmsis"):
        export(twin[0], tmp_path, digits(1), target="deeploy")
    with pytest.raises(ExportError, match="cmsis_twin"):
        export(pact8[1], tmp_path, digits(1), target="deeploy-cmsis")


def test_twin_equals_the_exact_requant_where_no_rounding_is_involved():
    """A pure shift (mul = 2^(d-2), add = half a step): D keeps the same ratio, k = 0, the codes are exact."""
    r = Requant(torch.tensor(1 << 8), torch.tensor(1 << 9), 10, -128, 127, 1.0, True, 256)
    cm, row = cmsis_requant(r, torch.tensor(-512), torch.tensor(511), name="shift")
    x = torch.arange(-512, 512).view(-1, 1)
    assert row["error"] == 0 and int(cm.bias) == 0 and torch.equal(cm(x), r(x))
