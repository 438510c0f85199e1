"""int32 requantization: proven input intervals hold, the shift is the largest that keeps every partial sum of
the device kernel inside int32, the int32 twin computes exactly that arithmetic, calibration gives larger
shifts and an overflow beyond its bound is caught; shift groups and the pre-clip keep every partial sum of
their Deeploy nodes inside int32 and the exact codes within their proven error; compare against an integer
reference; the plan's identical_pct."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from labkit.integer import (
    INT32_MAX,
    Int32Requant,
    IntegerizeError,
    Requant,
    compare,
    input_intervals,
    int32_requant,
    int32_twin,
    requant_layers,
)

from test_integerize import digits


@pytest.fixture(scope="module")
def twins(pact8, one_thread):
    """The plain int32 twin: one shift per requantization, no pre-clip, the constants rounded."""
    qnet, inet = pact8
    return qnet, inet, *int32_twin(inet, max_groups=1, preclip=False, flat=False)


@pytest.fixture(scope="module")
def precise(pact8, one_thread):
    """The default int32 twin (shift groups and pre-clip where they lower the proven error)."""
    return int32_twin(pact8[1])


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
    images = torch.cat([digits(8), torch.full((1, 3, 32, 32), -128 * eps),
                        torch.full((1, 3, 32, 32), 127 * eps),
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
    assert torch.equal(lo, torch.minimum(w * 0, w * 255).sum(1)) and torch.equal(
        hi, torch.maximum(w * 0, w * 255).sum(1)
    )


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

        # mul, add of the exact requantization rounded to the shift d_try (half up, exact ints)
        def at(d_try, r=r):
            k = r.d - d_try
            return [
                torch.tensor(
                    [(int(v) + (1 << (k - 1))) >> k if k else int(v) for v in t.reshape(-1).tolist()]
                )
                for t in (r.mul, r.add)
            ]

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
    inet_cal, plan = int32_twin(inet, calibration=[images], margin=1.5, max_groups=1, preclip=False,
                                flat=False)
    assert plan.margin == 1.5 and all(r["bounds"] == "calibrated" for r in plan.layers)
    gains = [c["d32"] - p["d32"] for c, p in zip(plan.layers, proven.layers)]
    assert min(gains) >= 0 and max(gains) >= 1
    inet_cal(images)  # within the calibrated bounds
    blank, _ = int32_twin(inet, calibration=[torch.zeros(2, 3, 32, 32)], margin=1.0, max_groups=1,
                          preclip=False,
                          flat=False)
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


# ------------------------------------------------------------------------------------------ groups and
# pre-clip
def exact_requant(ratios, offsets, lo, hi, signed, d=40):
    """A labkit requantization ``y = clip(floor(x ratio + offset + 1/2))`` per channel, 256 levels."""
    mul = torch.tensor([round(r * 2 ** d) for r in ratios])
    add = torch.tensor([round((o + 0.5) * 2 ** d) for o in offsets])
    return Requant(mul, add, d, lo, hi, 1.0, signed, 256, reduce=False)


def exact_values(r, x):
    """``(x mul + add)`` per element and channel (dim 1), exact int64, and the exact output."""
    t = x * r.mul.view(1, -1) + r.add.view(1, -1)
    return t, (t >> r.d).clamp(r.lo, r.hi)


def deeploy_int32(r32, x):
    """The Deeploy nodes of one int32 requantization (pre-clip RequantShift/Mul/Add per side, a RequantShift
    per shift group, their sum), emulated element by element; every partial sum must stay inside int32."""
    def fits(t):
        assert int(t.abs().max()) <= INT32_MAX, "int32 overflow"
        return t

    def rqs(v, mul, add, d, lo, hi):  # Deeploy's kernel: t = v mul + (add - h); t += h; clip(t >> d)
        h = 1 << (d - 1) if d else 0
        t = fits(fits(fits(v * mul) + (add - h)) + h)
        return (t >> d).clamp(lo, hi)

    out = x
    if r32.clip is not None:
        for edge, sign in ((r32.clip.top, 1), (r32.clip.bot, -1)):
            if edge is not None:
                e = rqs(x, sign, -sign * edge.view(1, -1), r32.clip.k, 0, 255)
                out = fits(out + fits(e * (-sign << r32.clip.k)))
    total = torch.zeros_like(x)
    mul, add = r32.mul.view(1, -1).expand(1, x.shape[1]), r32.add.view(1, -1).expand(1, x.shape[1])
    for d, members in r32.groups:
        keep = torch.zeros(x.shape[1], dtype=torch.bool)
        keep[members or slice(None)] = True
        total += rqs(out, torch.where(keep, mul, 0), torch.where(keep, add, 0), d, r32.lo, r32.hi)
    return total


def worst_case_inputs(lo, hi, n=20000, seed=0):
    """Every channel's interval ends, its window edges and zero, then random values over the whole
    interval."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.cat([torch.tensor([a, b, 0]), torch.randint(a, b + 1, (n,), generator=g)]) for a,
            b in zip(lo, hi)]
    return torch.stack(cols, 1)


def test_preclip_keeps_int32_and_the_exact_codes_within_its_proven_error():
    """A 1x1 projection as in the 8-bit nets: proven |acc| up to 1.9 million, output codes -128..127, so one
    int32 multiply leaves ~10 bits of multiplier. The pre-clip saturates the input outside the window where
    the output clips anyway: a larger shift, every partial sum (of the emulated Deeploy nodes too) inside
    int32, the exact code wherever the exact value lies farther than the proven error from a rounding
    boundary, and outside the window the exact (saturated) code always."""
    r = exact_requant([0.00097, 0.00131], [0.3, -7.2], -128, 127, True)
    lo, hi = torch.tensor([-1_900_000, -1_100_000]), torch.tensor([1_700_000, 1_950_000])
    plain, row0 = int32_requant(r, lo, hi, name="proj", max_groups=1, preclip=False)
    clipped, row = int32_requant(r, lo, hi, name="proj", max_groups=1, preclip=True, tolerance=0.0)
    assert clipped.clip is not None and clipped.clip.sides == "hi+lo" and row["preclip"] == "hi+lo"
    assert row["d32"] >= row0["d32"] + 3 and row["bound"] <= INT32_MAX and row["error"] < row0["error"] / 8
    x = worst_case_inputs(lo.tolist(), hi.tolist())
    edges = torch.stack([clipped.clip.top + s for s in (-1, 0, 1)] + [clipped.clip.bot + s for s in (-1, 0,
                                                                                                     1)])
    x = torch.cat([x, edges])
    t, y = exact_values(r, x)
    y32 = clipped(x)  # raises on any int32 overflow
    assert torch.equal(deeploy_int32(clipped, x), y32)
    inside = (x > clipped.clip.bot.view(1, -1)) & (x < clipped.clip.top.view(1, -1))
    assert torch.equal(y32[~inside], y[~inside]) and int((y32 - y).abs().max()) <= 1
    frac = t % (1 << r.d)
    margin = torch.minimum(frac, (1 << r.d) - frac).double() / 2 ** r.d  # distance to the nearest boundary
    far = margin > row["error"]
    assert torch.equal(y32[far], y[far]) and far.double().mean() > 0.99
    # without the pre-clip the same inputs differ more often
    assert int((plain(x) != y).sum()) > 4 * int((y32 != y).sum())


def test_groups_give_the_small_ratio_channels_their_own_shift():
    """One channel with a large ratio and a large proven range (the first depthwise conv of the 8/8 nets)
    forces a small shift on all channels; with groups each channel keeps (close to) its own largest safe
    shift."""
    r = exact_requant([0.76, 0.0047, 0.0061, 0.0052], [0.0, 0.2, -0.4, 0.1], 0, 255, False)
    lo, hi = torch.full((4,), -145_605), torch.full((4,), 150_000)
    one, row1 = int32_requant(r, lo, hi, name="dw", max_groups=1, preclip=False)
    own = [int32_requant(exact_requant([ratio], [0.0], 0, 255, False), lo[:1], hi[:1], max_groups=1,
                         preclip=False)[1]["d32"] for ratio in (0.76, 0.0047, 0.0061, 0.0052)]
    assert row1["groups"] == 1 and row1["d32"] == min(own)
    two, row2 = int32_requant(r, lo, hi, name="dw", max_groups=2, preclip=False)
    assert row2["groups"] == 2 and [d for d, _ in two.groups] == [own[0], min(own[1:])]
    assert two.groups[0][1] == [0] and row2["error"] < row1["error"] / 32 and row2["bound"] <= INT32_MAX
    x = worst_case_inputs(lo.tolist(), hi.tolist())
    t, y = exact_values(r, x)
    y32 = two(x)
    assert torch.equal(deeploy_int32(two, x), y32)
    frac = t % (1 << r.d)
    far = torch.minimum(frac, (1 << r.d) - frac).double() / 2 ** r.d > row2["error"]
    assert torch.equal(y32[far], y[far])
    with pytest.raises(IntegerizeError, match="max_groups must be >= 1"):
        int32_requant(r, lo, hi, max_groups=0)


def test_default_twin_every_layer_in_int32_and_exact_on_constant_images(pact8, precise):
    """The default twin: per channel mul within 2 of the exact one rounded at its group's shift, every partial
    sum of its Deeploy nodes inside int32 (the plan's bound on the proven interval and, on real inputs, the
    nodes emulated), and on the constant images (every input code) the centre codes identical to the exact
    twin's in every layer whose flat_pct is 100."""
    inet = pact8[1]
    inet32, plan = precise
    exact = dict(requant_layers(inet))
    seen = {}
    hooks = [r.register_forward_hook(lambda _m, a, y, name=name: seen.setdefault(name, []).append((a[0], y)))
             for name, r in requant_layers(inet)]
    q = inet.input_quant
    with torch.no_grad():
        inet(digits(8))
        inet((torch.arange(q.lo, q.hi + 1).double() * q.eps).view(-1, 1, 1, 1).expand(-1, *q.out_shape))
    for h in hooks:
        h.remove()
    assert any(row["preclip"] for row in plan.layers) and any(row["groups"] > 1 for row in plan.layers)
    assert sum(row["flat_pct"] == 100.0 for row in plan.layers) > len(plan.layers) / 2
    for (name, r32), row in zip(requant_layers(inet32), plan.layers):
        r = exact[name]
        n = r32.mul.numel()
        shifts = r32.shifts.expand(n) if r32.shifts.dim() == 0 else r32.shifts
        for c in range(n):
            k = r.d - int(shifts[c])
            m = int(r.mul.reshape(-1)[c if r.mul.numel() > 1 else 0])
            assert abs(int(r32.mul.reshape(-1)[c]) - ((m + (1 << (k - 1))) >> k if k else m)) <= 2, (name, c)
        assert row["bound"] <= INT32_MAX and row["error"] < 1 and row["nodes"] >= 1
        (x, _), (flat_x, flat_y) = seen[name]
        x = x.transpose(0, 1).flatten(1).transpose(0, 1)  # (elements, channels)
        assert torch.equal(deeploy_int32(r32, x), r32(x)), name
        centre = (slice(None), slice(None), *[size // 2 for size in flat_x.shape[2:]])
        if row["flat_pct"] == 100.0:
            assert torch.equal(r32(flat_x[centre]), flat_y[centre]), name


def test_precise_deeploy_export_reproduced_by_onnxruntime(precise, tmp_path):
    from labkit.export import check_export, export

    inet32, plan = precise
    paths = export(inet32, tmp_path, digits(4), target="deeploy", batch=2)
    result = check_export(tmp_path)
    assert result["exact"] and result["samples"] == 4 and "Mul" in result["ops"]
    assert torch.equal(torch.from_numpy(np.load(paths["outputs"])["output"]), inet32(digits(4)))


def test_plan_reports_identical_codes_per_layer(twins):
    _, inet, inet32, plan = twins
    result = compare(inet, inet32, digits(8))
    plan.add_agreement(result, "8 digits")
    table = plan.table()
    assert table.columns[-1] == "identical_pct" and "8 digits" in table.title
    assert [r["identical_pct"] for r in plan.layers] == [r["identical"] for r in result.code_layers]
    assert "identical_pct" in table.to_csv().splitlines()[0]
    with pytest.raises(IntegerizeError, match="compare\\(inet, inet32"):
        plan.add_agreement(dataclasses.replace(result, reference="fake-quant"), "x")


_TWINS: dict = {}


def _trained_twins(qat_runs, name):
    """``(plan, Comparison)``: the default int32 twin of the trained run against its exact twin, all 360
    validation images, bounds proven (measured once per run for the precision and prediction tests)."""
    if qat_runs[name] in _TWINS:
        return _TWINS[qat_runs[name]]
    from torch.utils.data import DataLoader

    from labkit.lab.twins import integerize_run
    from labkit.train.data import EmbeddedDigits

    inet = integerize_run(qat_runs[name]).inet
    inet32, plan = int32_twin(inet)
    result = compare(inet, inet32, DataLoader(EmbeddedDigits("valid"), batch_size=120))
    plan.add_agreement(result, "360 validation images")
    print(f"{name}: {plan.summary()}")
    assert result.n == 360 and all(
        row["bound"] <= INT32_MAX and row["bounds"] == "proven" for row in plan.layers
    )
    _TWINS[qat_runs[name]] = plan, result
    return plan, result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pact8", "tqt8", "pact4", "tqt4"])
def test_trained_nets_default_twin_precision(qat_runs, name, one_thread):
    """The issue's acceptance on the embedded default as its configs train it (conftest.qat_runs): >= 99.9%
    identical codes in every layer for the 8/8 nets, >= 99.99% for the 4/4 nets."""
    plan, result = _trained_twins(qat_runs, name)
    assert result.min_identical >= (99.9 if name.endswith("8") else 99.99), plan.agreement


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pact8", "tqt8"])
def test_trained_nets_default_twin_predictions(qat_runs, name, one_thread):
    """The issue's acceptance: the int32 twin of an 8/8 net predicts what its exact twin predicts on all 360
    validation images."""
    _, result = _trained_twins(qat_runs, name)
    assert result.predictions == 100.0


def test_cli_refuses_int32_forms_outside_the_deeploy_target(tmp_path, capsys):
    from labkit.cli import main

    (tmp_path / "run").mkdir()  # the run is checked first
    for flag in (["--no-preclip"], ["--max-groups", "1"]):
        assert main(["export", str(tmp_path / "run"), "--target", "onnx", *flag, "-o",
                     str(tmp_path / "out")]) == 2
        assert (
            "--max-groups and --no-preclip set the int32 twin of --target deeploy only"
            in capsys.readouterr().err
        )
