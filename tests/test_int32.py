"""int32 requantization: proven input intervals hold, the shift is the largest that keeps every partial sum of the
device kernel inside int32, the int32 twin computes exactly that arithmetic, calibration gives larger shifts and
an overflow beyond its bound is caught; compare against an integer reference."""

import math

import pytest
import torch

from labkit.integer import (
    INT32_MAX,
    Int32Requant,
    IntegerizeError,
    Requant,
    compare,
    input_intervals,
    int32_twin,
    requant_layers,
)

from test_integerize import digits


@pytest.fixture(scope="module")
def twins(pact8, one_thread):
    qnet, inet = pact8
    return qnet, inet, *int32_twin(inet)


def kernel_bound(mul, add, d, lo, hi) -> int:
    """max over channels and interval ends of |x mul| + |add - 2^(d-1)| + 2^(d-1), on exact integers."""
    h = 1 << (d - 1) if d else 0
    n = max(mul.numel(), add.numel(), lo.numel(), hi.numel())
    cols = [[int(v) for v in t.reshape(-1).tolist()] for t in (mul, add, lo, hi)]
    cols = [c * n if len(c) == 1 else c for c in cols]
    return max(max(abs(a * m), abs(b * m)) + abs(s - h) + h for m, s, a, b in zip(*cols))


def test_proven_intervals_contain_every_input_on_the_grid(twins):
    _, inet, _, _ = twins
    intervals = input_intervals(inet)
    seen = {}
    hooks = [r.register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, []).append(a[0]))
             for name, r in requant_layers(inet)]
    torch.manual_seed(0)
    eps = inet.eps_in
    images = torch.cat([digits(8), torch.full((1, 3, 32, 32), -128 * eps), torch.full((1, 3, 32, 32), 127 * eps),
                        torch.randint(-128, 128, (6, 3, 32, 32)).double() * eps])
    with torch.no_grad():
        inet(images)
    for h in hooks:
        h.remove()
    for name, (lo, hi) in intervals.items():
        x = seen[name][0].transpose(0, 1).flatten(1)
        assert bool((x.amin(1) >= lo).all()) and bool((x.amax(1) <= hi).all()), name
    # a depthwise conv's channel interval is sum_k min(w lo, w hi) .. sum_k max(w lo, w hi) over its codes
    conv = dict(inet.named_modules())["features.0.residual_branch.0.0"]
    w = conv.weight.flatten(1)
    lo, hi = intervals["features.0.residual_branch.0.2"]
    assert torch.equal(lo, torch.minimum(w * 0, w * 255).sum(1)) and torch.equal(hi, torch.maximum(w * 0, w * 255).sum(1))


def test_shift_is_the_largest_that_fits_int32(twins):
    _, inet, inet32, plan = twins
    intervals = input_intervals(inet)
    exact = dict(requant_layers(inet))
    for (name, r32), row in zip(requant_layers(inet32), plan.layers):
        assert isinstance(r32, Int32Requant) and row["layer"] == name and row["d32"] == r32.d
        lo, hi = intervals[name]
        bound = kernel_bound(r32.mul, r32.add, r32.d, lo, hi)
        assert bound == row["bound"] <= INT32_MAX and row["headroom"] == INT32_MAX - bound
        r = exact[name]
        assert r32.d <= r.d

        def at(d_try):  # mul, add of the exact requantization rounded to the shift d_try (half up, exact ints)
            k = r.d - d_try
            return [torch.tensor([(int(v) + (1 << (k - 1))) >> k if k else int(v) for v in t.reshape(-1).tolist()])
                    for t in (r.mul, r.add)]

        assert [torch.equal(a, b.reshape(-1)) for a, b in zip(at(r32.d), (r32.mul, r32.add))] == [True, True]
        assert kernel_bound(*at(r32.d), r32.d, lo, hi) <= INT32_MAX
        if r32.d < r.d:  # one more bit of shift would overflow
            assert kernel_bound(*at(r32.d + 1), r32.d + 1, lo, hi) > INT32_MAX, name
        # mul32 / 2^d32 approximates mul / 2^d to the rounding of mul32
        assert torch.all((r32.mul.double() * 2 ** (r.d - r32.d) - r.mul.double()).abs() <= 2 ** (r.d - r32.d))
    assert plan.worst["headroom"] == min(row["headroom"] for row in plan.layers)


def test_int32_requant_is_the_kernel_arithmetic_and_catches_overflow():
    mul, add, d = torch.tensor([3000, -2000]), torch.tensor([1 << 9, 5 << 9]), 10
    r = Int32Requant(mul, add, d, -128, 127, 1.0, True, 256, name="layer", proven=False)
    x = torch.randint(-(2 ** 19), 2 ** 19, (5, 2, 4, 4))
    # device: t = x mul + (add - 2^(d-1)); t += 2^(d-1); t >> d; clip
    ref = ((x * mul.view(1, -1, 1, 1) + (add - 512).view(1, -1, 1, 1) + 512) >> d).clamp(-128, 127)
    assert torch.equal(r(x), ref)
    assert torch.equal(r(x), Requant(mul, add, d, -128, 127, 1.0, True, 256)(x))
    big = torch.full((1, 2, 1, 1), 2 ** 21)  # 2^21 * 3000 > 2^31
    with pytest.raises(IntegerizeError, match="'layer' overflows.*larger margin"):
        r(big)


def test_calibrated_shifts_are_larger_and_an_input_beyond_them_is_caught(twins):
    _, inet, _, proven = twins
    images = digits(16)
    inet_cal, plan = int32_twin(inet, calibration=[images], margin=1.5)
    assert plan.margin == 1.5 and all(r["bounds"] == "calibrated" for r in plan.layers)
    gains = [c["d32"] - p["d32"] for c, p in zip(plan.layers, proven.layers)]
    assert min(gains) >= 0 and max(gains) >= 1
    inet_cal(images)  # within the calibrated bounds
    blank, _ = int32_twin(inet, calibration=[torch.zeros(2, 3, 32, 32)], margin=1.0)
    with pytest.raises(IntegerizeError, match="calibrated bound does not hold"):
        blank(images)
    with pytest.raises(IntegerizeError, match="margin must be >= 1"):
        int32_twin(inet, calibration=[images], margin=0.5)


def test_compare_against_an_integer_reference(twins):
    _, inet, inet32, _ = twins
    images = digits(8)
    same = compare(inet, inet, images)
    assert same.min_identical == same.min_e2e_identical == 100.0 and same.predictions == 100.0
    result = compare(inet, inet32, images)
    assert result.reference == "integer reference" and "integer vs integer reference" in result.table().title
    assert [r["layer"] for r in result.code_layers] == [n for n, _ in requant_layers(inet)]
    assert all(r["max_diff"] <= 1 for r in result.code_layers)  # one rounding of mul/add: off by one at most
    worst = result.worst
    assert 90.0 < worst["identical"] < 100.0 and not math.isnan(worst["identical"])
