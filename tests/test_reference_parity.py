"""labkit's PACT/SAWB/TQT quantizers against the reference framework's own numbers, case by case.

The golden data (``../shared/reference-parity``: ``inputs.npz``, ``reference.npz`` and the README saying how
each case was driven) come from the reference library's modules. Every case is reproduced here with
labkit's public API and the README's procedure (settings as constructor kwargs, a controller with
``{0: "start"}``, ``step_pre_training_epoch(0)``, ``step_pre_training_batch()``, forward, backward; TQT
gradients normalised once per iteration with ``normalize_tqt_grads``, as the training loop does), and every
stored quantity is compared: within 1e-5, relative where values exceed 1. Where labkit deliberately differs
(:data:`DEVIATIONS`, explained in docs/reference-parity.md), the test asserts instead that each side follows
its own stated formula and that the difference is really there, so neither can pass by accident.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.quant import (
    PACTAsymmetricAct,
    PACTConv2d,
    PACTUnsignedAct,
    get_pact_controllers,
    normalize_tqt_grads,
    pact_quantize,
    sawb_coefficients,
)
from labkit.quant.init import SAWB_GUARD_ABOVE

from helpers import ROOT


def _data_folder() -> Path | None:
    env = os.environ.get("LABKIT_REFERENCE_PARITY")
    if env:
        return Path(env)
    folder = ROOT.parent / "shared" / "reference-parity"
    return folder if folder.is_dir() else None


DATA = _data_folder()
pytestmark = [
    pytest.mark.skipif(DATA is None, reason="no reference-parity data: "
                                            f"{ROOT.parent / 'shared' / 'reference-parity'} is absent (a "
                                            "clone without ../shared); set LABKIT_REFERENCE_PARITY=DIR"),
    pytest.mark.usefixtures("one_thread"),
]

ATOL = 1e-5
BETA = 0.9
REF_NORM_EPS, OWN_NORM_EPS = 1e-5, 1e-12

#: labkit's deliberate deviations from the reference (docs/reference-parity.md gives the measured sizes)
DEVIATIONS = {
    "sawb_symm_grid": "labkit puts the symmetric SAWB alpha on its almost-symmetric grid (lo = -alpha, "
                      "eps = alpha / (n/2)), where zero is a code; the reference's exactly symmetric grid "
                      "(-alpha, alpha, eps = 2 alpha / (n - 1)) has no zero for even n, so an integer "
                      "network could not represent a zero weight",
    "sawb_high_bits_guard": "above 16 levels labkit takes max |w| wherever it quantizes the weights with a "
                            "lower mean squared error than SAWB's fit: there c2 / c1 > 1.02 and the fit "
                            "collapses towards 0 on light-tailed channels (for Gaussian weights at 256 "
                            "levels it is 2.85 sigma, where the MSE-optimal clip is about 3.9 sigma); the "
                            "reference uses the fit wherever it is positive",
    "pact_alpha_gradient": "the reference's unsigned bound gets no gradient as configured (force0: a "
                           "symmetric flag disables it, its known defect); labkit learns alpha with the PACT "
                           "gradient, which equals the reference's own formula once trainable (force1)",
    "std_statistics_prior": "init_clip 'std': the reference starts its mean / variance EMAs from 0 / 1, a "
                            "data-independent prior that still weighs 0.9^3 = 73% after three batches; "
                            "labkit starts them from the first batch (same momentum, same unbiased variance)",
    "tqt_regions_on_codes": "TQT regions on the rounded code R(x/s), as in the TQT paper (the output there "
                            "is the grid's end value, reached by rounding, not by clipping); the reference "
                            "decides on x, so x within half a step beyond a bound gets no x gradient and s "
                            "ln2 p (or n)",
    "tqt_normalisation_eps": "the log2 t gradient is normalised by sqrt(v_hat) + 1e-12, a guard against 0/0 "
                             "only; the reference adds 1e-5, which shrinks the normalised step of small raw "
                             "gradients",
}

NS = (256, 16)
CASES = (
    [f"pact_u/{n}/{init}/force{f}" for n in NS for init in ("const", "max", "std") for f in (0, 1)]
    + [f"pact_u/{n}/max_relu/force1" for n in NS]
    + [f"pact_s/{n}/symm{s}/{init}" for n in NS for s in (0, 1) for init in ("max", "const")]
    + [f"tqt_u/{n}/{init}" for n in NS for init in ("const", "max")]
    + [f"tqt_s/{n}/max" for n in NS]
    + [f"w/{k}/{n}/{q}/{init}" for k in ("conv", "dw") for n in NS for q in ("per_channel", "per_layer")
       for init in ("sawb_symm", "sawb_asymm", "max")]
    + [f"tqt_w/{k}/{n}/{q}/max" for k in ("conv", "dw") for n in NS for q in ("per_channel", "per_layer")]
)
#: TQT cases in which some element lies within half a step beyond a bound (measured on these inputs)
TQT_BORDER_CASES = {"tqt_u/256/const", "tqt_u/256/max", "tqt_u/16/const", "tqt_u/16/max", "tqt_s/16/max",
                    "tqt_w/conv/256/per_channel/max", "tqt_w/conv/16/per_channel/max",
                    "tqt_w/dw/256/per_channel/max",
                    "tqt_w/dw/16/per_channel/max", "tqt_w/dw/16/per_layer/max"}


def deviations_of(case: str) -> set[str]:
    """The deviations that show in ``case`` (each one is asserted to be real there)."""
    out = set()
    if case.endswith("/sawb_symm"):
        out.add("sawb_symm_grid")
    if case.startswith("w/") and "/sawb_" in case and int(case.split("/")[2]) > SAWB_GUARD_ABOVE:
        out.add("sawb_high_bits_guard")
    if case.startswith("pact_u/") and case.endswith("force0"):
        out.add("pact_alpha_gradient")
    if "/std/" in case:
        out.add("std_statistics_prior")
    if case in TQT_BORDER_CASES:
        out.add("tqt_regions_on_codes")
    if case.startswith("tqt"):
        out.add("tqt_normalisation_eps")
    return out


# ------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def golden():
    if not (DATA / "inputs.npz").is_file() or not (DATA / "reference.npz").is_file():
        pytest.fail(f"{DATA} lacks inputs.npz / reference.npz (LABKIT_REFERENCE_PARITY points at the wrong "
                    "folder?)")
    with np.load(DATA / "inputs.npz") as i, np.load(DATA / "reference.npz") as r:
        return {k: i[k] for k in i.files}, {k: r[k] for k in r.files}


class Case:
    """The reference's quantities of one case; :meth:`ref` marks each one as checked."""

    def __init__(self, name: str, reference: dict):
        self.name = name
        self.stored = {k.rsplit("/", 1)[1]: v for k, v in reference.items() if k.rsplit("/", 1)[0] == name}
        assert self.stored, f"case {name} is not in reference.npz"
        self.checked: set[str] = set()

    def ref(self, key: str) -> np.ndarray:
        self.checked.add(key)
        return self.stored[key].astype(np.float64)

    def same(self, key: str, ours, rel_to_ref: bool = True) -> None:
        """labkit's ``ours`` equals the reference's ``key`` within ATOL (relative above 1)."""
        close(np.asarray(_np(ours)).reshape(self.stored[key].shape), self.ref(key), f"{self.name}/{key}",
              rel_to_ref)

    def done(self) -> None:
        missing = set(self.stored) - self.checked
        assert not missing, f"{self.name}: stored quantities not compared: {sorted(missing)}"


def _np(t) -> np.ndarray:
    return t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def close(ours, expected, what: str, rel: bool = True) -> None:
    ours, expected = _np(ours), _np(expected)
    assert ours.size == expected.size, f"{what}: shape {ours.shape} != {expected.shape}"
    expected = expected.reshape(ours.shape)
    scale = np.maximum(1.0, np.abs(expected)) if rel else 1.0
    err = np.abs(ours - expected) / scale
    assert np.isfinite(ours).all() and err.max() <= ATOL, (
        f"{what}: max difference {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
        f" ({(err > ATOL).mean():.2%})"
    )


def differs(a, b) -> bool:
    a, b = _np(a), _np(b)
    return bool((np.abs(a - b) / np.maximum(1.0, np.abs(b)) > ATOL).any())


# ------------------------------------------------------------------------------------------------- formulas
def fake_quant(x, lo, hi, n):
    """PACT grid: ``lo + eps * floor((clip(x, lo, hi) - lo) / eps + 1/2)``, ``eps = (hi - lo) / (n - 1)``."""
    eps = (hi - lo) / (n - 1)
    return lo + eps * np.floor((np.clip(x, lo, hi) - lo) / eps + 0.5)


def tqt_grads(x, g, s, n, p, axes, bounds=None):
    """TQT ``(dL/dx, raw dL/dlog2 t)``; regions on the rounded codes (paper), or on x when given the grid's
    ``bounds = (lo, hi)`` (the reference: ``x < lo`` below, ``x >= hi`` above)."""
    c = np.floor(x / s + 0.5)
    below, above = (c < n, c > p) if bounds is None else (x < bounds[0], x >= bounds[1])
    inside = ~below & ~above
    local = np.where(inside, c - x / s, np.where(below, n, p))
    return g * inside, math.log(2) * np.reshape(s, -1) * np.reshape((g * local).sum(axis=axes), -1)


def normalised(raw: list, eps_const: float) -> tuple[list, list]:
    """Adam-like normalisation per iteration: ``v = beta v + (1 - beta) g^2``, ``tanh(g / (sqrt(v_hat) +
    c))``."""
    var, out, vs = 0.0, [], []
    for k, g in enumerate(raw, start=1):
        var = BETA * var + (1 - BETA) * g ** 2
        out.append(np.tanh(g / (np.sqrt(var / (1 - BETA ** k)) + eps_const)))
        vs.append(var)
    return out, vs


def ema_clip(batches, first_copied: bool, nb_std: float = 3.0, momentum: float = 0.1) -> float:
    """``mean + nb_std * std`` of EMAs of batch means / unbiased variances (from 0 / 1 unless first
    copied)."""
    mean, var = 0.0, 1.0
    for k, b in enumerate(batches):
        bm, bv = b.mean(), b.var(ddof=1)
        mean, var = (bm, bv) if (first_copied and k == 0) else ((1 - momentum) * mean + momentum * bm,
                                                                 (1 - momentum) * var + momentum * bv)
    return mean + nb_std * math.sqrt(var)


def started(module, group: str, **start_kwargs):
    """A controller over ``module`` whose schedule ``{0: "start"}`` has been applied (epoch 0)."""
    (ctrl,) = get_pact_controllers(module, {group: {0: "start"}}, **start_kwargs)
    ctrl.step_pre_training_epoch(0)
    return ctrl


# ------------------------------------------------------------------------------------------------- the tests
def test_the_golden_data_holds_exactly_the_cases_covered_here(golden):
    _, reference = golden
    assert sorted({k.rsplit("/", 1)[0] for k in reference}) == sorted(CASES)


def test_every_deviation_shows_in_some_case_and_has_a_reason():
    used = set().union(*(deviations_of(c) for c in CASES))
    assert used == set(DEVIATIONS)
    assert all(len(reason) > 80 for reason in DEVIATIONS.values())


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("pact_u/")])
def test_unsigned_pact_activation(golden, case):
    inputs, reference = golden
    c = Case(case, reference)
    n, init, force = int(case.split("/")[1]), case.split("/")[2], case.endswith("force1")
    kind = "relu" if init == "max_relu" else "relu6"
    act = PACTUnsignedAct(n_levels=n, init_clip=init.removesuffix("_relu"), learn_clip=True, act_kind=kind,
                          rounding=True).train()
    with torch.no_grad():
        for k in range(3):
            act(torch.from_numpy(inputs[f"calib_{k}"]))
    ctrl = started(act, "activation", kwargs_activation={"init_clip_hi": 6.0, "init_clip_lo": -6.0})
    ctrl.step_pre_training_batch()
    lo, hi = act.get_clip()
    x = torch.from_numpy(inputs["x_act"]).requires_grad_()
    y = act(x)
    (y * torch.from_numpy(inputs["g_act"])).sum().backward()

    xs, g = inputs["x_act"].astype(np.float64), inputs["g_act"].astype(np.float64)
    alpha = hi.item()
    paper_grad = g[xs >= alpha].sum()  # PACT: dL/dalpha = sum of g where x >= alpha
    c.same("lo0", lo)
    assert act.clip_hi.requires_grad and act.clip_hi.grad is not None
    close(act.clip_hi.grad, paper_grad, f"{case}: labkit's dL/dalpha against the paper's formula")
    assert c.ref("req_grad").tolist() == [0.0]  # as configured, the reference's bound is not trainable
    std = "std_statistics_prior" in deviations_of(case)
    if not force:  # deviation pact_alpha_gradient: the reference's bound gets no gradient at all
        assert np.isnan(c.ref("g_high0")).all() and paper_grad != 0
    elif std:  # the reference's formula on its own alpha
        close(c.ref("g_high0"), g[xs >= c.stored["hi0"].item()].sum(), f"{case}: the reference's dL/dalpha")
    else:
        c.same("g_high0", act.clip_hi.grad)
    if std:
        calib = [np.clip(inputs[f"calib_{k}"].astype(np.float64), 0, 6) for k in range(3)]
        close(c.ref("hi0"), ema_clip(calib, first_copied=False), f"{case}: the reference's std rule")
        close(alpha, ema_clip(calib, first_copied=True), f"{case}: labkit's std rule")
        assert differs(alpha, c.ref("hi0"))
        # apart from alpha the quantizers agree: each side's output and dL/dx follow from its own alpha
        for who, a in (("reference", c.ref("hi0").item()), ("labkit", alpha)):
            out = c.ref("y0") if who == "reference" else y
            gx = c.ref("gx0") if who == "reference" else x.grad
            close(out, fake_quant(xs, 0.0, a, n), f"{case}: {who}'s output on its alpha")
            close(gx, g * ((xs >= 0) & (xs < a)), f"{case}: {who}'s dL/dx on its alpha")
    else:
        c.same("hi0", hi)
        c.same("y0", y)
        c.same("gx0", x.grad)
    c.done()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("pact_s/")])
def test_signed_pact_activation(golden, case):
    inputs, reference = golden
    c = Case(case, reference)
    n, symm, init = int(case.split("/")[1]), case.split("/")[2] == "symm1", case.split("/")[3]
    act = PACTAsymmetricAct(n_levels=n, init_clip=init, learn_clip=True, act_kind="identity", symm=symm,
                            rounding=True).train()
    with torch.no_grad():
        for k in range(3):
            act(torch.from_numpy(inputs[f"calib_sgn_{k}"]))
    started(act, "activation", kwargs_activation={"init_clip_hi": 4.0,
                                                  "init_clip_lo": -4.0}).step_pre_training_batch()
    lo, hi = act.get_clip()
    x = torch.from_numpy(inputs["x_sgn"]).requires_grad_()
    y = act(x)
    (y * torch.from_numpy(inputs["g_act"])).sum().backward()
    for key, ours in (("lo0", lo), ("hi0", hi), ("y0", y), ("gx0", x.grad)):
        c.same(key, ours)
    if symm:
        # the reference learns clip_lo (hi = -lo (n-2)/n follows); labkit learns m = -lo: dL/dm = -dL/dlo
        assert c.ref("req_grad").tolist() == [0.0, 1.0] and np.isnan(c.ref("g_high0")).all()
        c.same("g_low0", -act.clip_hi.grad)
    else:
        assert c.ref("req_grad").tolist() == [1.0, 1.0]
        c.same("g_low0", act.clip_lo.grad)
        c.same("g_high0", act.clip_hi.grad)
    c.done()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("tqt_u/") or c.startswith("tqt_s/")])
def test_tqt_activation(golden, case):
    inputs, reference = golden
    c = Case(case, reference)
    signed, n, init = case.startswith("tqt_s"), int(case.split("/")[1]), case.split("/")[2]
    if signed:
        act = PACTAsymmetricAct(n_levels=n, init_clip=init, learn_clip=True, act_kind="identity", symm=True,
                                tqt=True)
        calib, x_key, hi0 = "calib_sgn", "x_sgn", 4.0
    else:
        act = PACTUnsignedAct(n_levels=n, init_clip=init, learn_clip=True, act_kind="relu6", tqt=True)
        calib, x_key, hi0 = "calib", "x_act", 6.0
    act.train()
    with torch.no_grad():
        for k in range(3):
            act(torch.from_numpy(inputs[f"{calib}_{k}"]))
    ctrl = started(act, "activation", kwargs_activation={"init_clip_hi": hi0, "init_clip_lo": -hi0})
    assert c.ref("req_grad").tolist() == ([0.0, 0.0, 1.0] if signed else [0.0, 1.0])  # only log2 t is learned
    ours, theirs = [], []
    for it, g_key in enumerate(("g_act", "g_act2")):
        ctrl.step_pre_training_batch()
        lo, hi = act.get_clip()
        x = torch.from_numpy(inputs[x_key]).requires_grad_()
        y = act(x)
        (y * torch.from_numpy(inputs[g_key])).sum().backward()
        raw = act.log2_t.grad.clone()
        normalize_tqt_grads([act])
        for key, val in (("lo", lo), ("hi", hi), ("y", y), ("logt", act.log2_t)):
            c.same(f"{key}{it}", val)
        assert np.isnan(c.ref(f"g_high{it}")).all() and (not signed or np.isnan(c.ref(f"g_low{it}")).all())
        close(c.ref(f"rbeta{it}"), BETA ** (it + 1), f"{case}: the reference's bias correction")
        ours.append(dict(gx=x.grad, raw=raw, norm=act.log2_t.grad.clone(), var=act.tqt_var.clone()))
        theirs.append(dict(gx=c.ref(f"gx{it}"), norm=c.ref(f"g_log_t{it}"), var=c.ref(f"var{it}"),
                           lo=c.ref(f"lo{it}"), hi=c.ref(f"hi{it}")))
        act.zero_grad()
    s = act.get_eps().double().numpy()
    lo_code, hi_code = (-(n // 2), n - 1 - n // 2) if signed else (0, n - 1)
    xs = inputs[x_key].astype(np.float64)
    grads = [inputs["g_act"].astype(np.float64), inputs["g_act2"].astype(np.float64)]
    _check_tqt(case, c, ours, theirs, xs, grads, s, lo_code, hi_code, axes=None)
    c.done()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("w/")])
def test_weight_quantizer_follows_the_weights(golden, case):
    c, conv, w_np, g, ctrl = _weight_case(golden, case, learn_clip=False)
    n, quantize, init = conv.n_levels, conv.quantize, conv.init_clip
    ctrl.step_pre_training_batch()
    lo, hi = conv.get_clip()
    wq = conv.quantized_weight()
    (wq * g).sum().backward()
    with torch.no_grad():
        conv.weight.mul_(1.5)
    ctrl.step_pre_training_batch()
    lo_after, hi_after = conv.get_clip()
    wq_after = conv.quantized_weight()
    guard = "sawb_high_bits_guard" in deviations_of(case)
    if init == "max" or (init == "sawb_asymm" and not guard):
        for key, ours in (("lo0", lo), ("hi0", hi), ("wq0", wq), ("gw0", conv.weight.grad),
                          ("hi_after_update", hi_after), ("wq_after_update", wq_after)):
            c.same(key, ours)
        c.done()
        return
    # each side against its own formula. The reference: SAWB's alpha (max |w| where <= 0) on (-alpha, alpha)
    # for sawb_symm (deviation sawb_symm_grid; where it falls back, on the almost-symmetric grid) and on the
    # almost- symmetric grid for sawb_asymm. labkit: that alpha on the almost-symmetric grid, and above 16
    # levels max |w| where that quantizes with the lower error (deviation sawb_high_bits_guard)
    per_channel = quantize == "per_channel"
    shape = (-1, 1, 1, 1) if per_channel else ()
    almost = (n // 2 - 1) / (n // 2)
    ref_lo = c.ref("lo0")
    # as multiplied in place (float32)
    w_after = (w_np.astype(np.float32) * np.float32(1.5)).astype(np.float64)
    for w, hi_key, wq_key, our_lo, our_hi, our_wq in ((w_np, "hi0", "wq0", lo, hi, wq),
                                                      (w_after, "hi_after_update", "wq_after_update",
                                                       lo_after,
                                                       hi_after, wq_after)):
        alpha, fallback = _sawb(w, n, per_channel, init)
        ours = _guarded(w, alpha, n, per_channel) if guard else alpha
        ref_hi = c.ref(hi_key)
        exact = fallback if init == "sawb_symm" else np.ones_like(fallback)
        close(ref_hi, np.where(exact, alpha * almost, alpha), f"{case}/{hi_key}: the reference's grid")
        close(our_hi, ours * almost, f"{case}/{hi_key}: labkit's almost-symmetric hi")
        close(our_lo, -ours, f"{case}/{hi_key}: labkit's lo")
        if hi_key == "hi0":
            close(ref_lo, -alpha, f"{case}/lo0: the reference's lo = -alpha")
        # each grid's output from its own (float32) bounds
        # the reference's output is labkit's float32 grid arithmetic on the reference's own (float32) bounds
        w32 = torch.from_numpy(w.astype(np.float32))
        theirs_lo = ref_lo if hi_key == "hi0" else -alpha  # stored for the first batch only
        ref_lo32, ref_hi32 = (torch.from_numpy(b.astype(np.float32)).reshape(shape) for b in (theirs_lo,
                                                                                              ref_hi))
        close(c.ref(wq_key), pact_quantize(w32, ref_lo32, ref_hi32, n),
              f"{case}/{wq_key}: the reference's grid")
        close(our_wq, fake_quant(w, _np(our_lo).reshape(shape), _np(our_hi).reshape(shape), n),
              f"{case}/{wq_key}: labkit's grid")
        assert differs(our_hi, ref_hi) and differs(our_wq, c.ref(wq_key))
        if guard:
            assert (ours != alpha).any()
    gw = g.double().numpy()
    ref_hi, our_hi, our_lo = c.ref("hi0").reshape(shape), _np(hi).reshape(shape), _np(lo).reshape(shape)
    close(c.ref("gw0"), gw * ((w_np >= ref_lo.reshape(shape)) & (w_np < ref_hi)),
          f"{case}/gw0: the reference's STE")
    close(conv.weight.grad, gw * ((w_np >= our_lo) & (w_np < our_hi)), f"{case}/gw0: labkit's STE")
    c.done()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("tqt_w/")])
def test_tqt_weights(golden, case):
    c, conv, w_np, g, ctrl = _weight_case(golden, case, learn_clip=True, tqt=True)
    n, per_channel = conv.n_levels, conv.per_channel
    ours, theirs = [], []
    for it in range(2):
        ctrl.step_pre_training_batch()
        lo, hi = conv.get_clip()
        wq = conv.quantized_weight()
        (wq * g).sum().backward()
        raw = conv.log2_t.grad.clone()
        normalize_tqt_grads([conv])
        for key, val in (("lo", lo), ("hi", hi), ("wq", wq), ("logt", conv.log2_t)):
            c.same(f"{key}{it}", val)
        ours.append(dict(gx=conv.weight.grad.clone(), raw=raw, norm=conv.log2_t.grad.clone(),
                         var=conv.tqt_var.clone()))
        theirs.append(dict(gx=c.ref(f"gw{it}"), norm=c.ref(f"g_log_t{it}"), var=c.ref(f"var{it}"),
                           lo=c.ref(f"lo{it}"), hi=c.ref(f"hi{it}")))
        conv.zero_grad()
    s = conv.get_eps().double().numpy().reshape((-1, 1, 1, 1) if per_channel else ())
    _check_tqt(case, c, ours, theirs, w_np, [g.double().numpy()] * 2, s, -(n // 2), n - 1 - n // 2,
               axes=(1, 2, 3) if per_channel else None)
    c.done()


# ------------------------------------------------------------------------------------------------- helpers
def _weight_case(golden, case: str, **settings):
    """``(Case, conv, weights as float64, upstream gradient, started linear controller)`` of a weight case
    ``<family>/<conv|dw>/<n>/<quantize>/<init>``: symmetric weights as in the reference's recipes."""
    inputs, reference = golden
    _, kind, n, quantize, init = case.split("/")
    conv, w_np, g = _conv(inputs, kind, n_levels=int(n), quantize=quantize, init_clip=init, symm_wts=True,
                          **settings)
    return Case(case, reference), conv, w_np, g, started(conv, "linear")


def _conv(inputs, kind: str, **settings):
    w = inputs["w_conv"] if kind == "conv" else inputs["w_dw"]
    g = inputs["g_wconv"] if kind == "conv" else inputs["g_wdw"]
    cin, groups = (16, 1) if kind == "conv" else (32, 32)
    conv = PACTConv2d(cin, 32, 3, padding=1, groups=groups, bias=False, **settings)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    return conv, w.astype(np.float64), torch.from_numpy(g)


def _sawb(w: np.ndarray, n: int, per_channel: bool, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, fallback)``: SAWB's ``c1 sqrt(E[w^2]) - c2 E|w|`` (``mode``'s coefficients), max |w| where <=
    0."""
    axes = (1, 2, 3) if per_channel else None
    c1, c2 = sawb_coefficients(n, mode)
    alpha = np.reshape(c1 * np.sqrt((w ** 2).mean(axis=axes)) - c2 * np.abs(w).mean(axis=axes), -1)
    fallback = alpha <= 0
    return np.where(fallback, np.reshape(np.abs(w).max(axis=axes), -1), alpha), fallback


def _guarded(w: np.ndarray, alpha: np.ndarray, n: int, per_channel: bool) -> np.ndarray:
    """labkit's SAWB above 16 levels: max |w| where it quantizes ``w`` with a lower mean squared error than
    ``alpha`` on the almost-symmetric grid (lo = -m, hi = -m + (n - 1) m / floor(n/2))."""
    axes = (1, 2, 3) if per_channel else None
    shape = (-1, 1, 1, 1) if per_channel else ()
    amax = np.reshape(np.abs(w).max(axis=axes), -1)

    def mse(m):
        q = fake_quant(w, -m.reshape(shape), (-m + (n - 1) * m / (n // 2)).reshape(shape), n)
        return np.reshape(((q - w) ** 2).mean(axis=axes), -1)

    return np.where(mse(amax) < mse(alpha), amax, alpha)


def _check_tqt(case, c, ours, theirs, x, grads, s, n, p, axes):
    """Both TQT gradient rules against their formulas, and the deviations between them."""
    border_seen = False
    for it, (o, t) in enumerate(zip(ours, theirs)):
        own_gx, own_raw = tqt_grads(x, grads[it], s, n, p, axes)
        lo, hi = t["lo"].reshape(np.shape(s)), t["hi"].reshape(np.shape(s))
        ref_gx, ref_raw = tqt_grads(x, grads[it], hi / p, n, p, axes, bounds=(lo, hi))
        assert np.allclose(lo, n * hi / p, rtol=1e-6)
        close(o["gx"], own_gx, f"{case}: labkit's dL/dx (regions on codes) #{it}")
        close(t["gx"], ref_gx, f"{case}: the reference's dL/dx (regions on x) #{it}")
        close(o["raw"].reshape(-1), own_raw, f"{case}: labkit's raw dL/dlog2 t #{it}")
        border = differs(own_gx, ref_gx)
        border_seen |= border
        if not border:
            close(o["gx"], t["gx"], f"{case}: dL/dx #{it}")
            close(o["var"].reshape(-1), t["var"].reshape(-1), f"{case}: running variance #{it}")
        o["ref_raw"] = ref_raw
    assert border_seen == ("tqt_regions_on_codes" in deviations_of(case)), \
        f"{case}: elements beyond a bound by less than half a step: {border_seen}; update TQT_BORDER_CASES"
    # normalisation (deviation tqt_normalisation_eps): each side's formula on its own raw gradients; the
    # reference's raw gradient is recovered from its running variance (|g|) and its normalised gradient (sign)
    own_norm, own_var = normalised([o["raw"].double().numpy().reshape(-1) for o in ours], OWN_NORM_EPS)
    var0, var1 = (t["var"].reshape(-1) for t in theirs)
    ref_raw = [np.sign(t["norm"].reshape(-1)) * np.sqrt(np.maximum(v, 0) / (1 - BETA))
               for t, v in zip(theirs, (var0, var1 - BETA * var0))]
    ref_norm, _ = normalised(ref_raw, REF_NORM_EPS)
    for it, (o, t) in enumerate(zip(ours, theirs)):
        close(o["norm"].reshape(-1), own_norm[it], f"{case}: labkit's normalised dL/dlog2 t #{it}")
        close(o["var"].reshape(-1), own_var[it], f"{case}: labkit's running variance #{it}")
        close(ref_raw[it], o["ref_raw"], f"{case}: the reference's raw dL/dlog2 t (regions on x) #{it}")
        close(t["norm"].reshape(-1), ref_norm[it], f"{case}: the reference's normalised dL/dlog2 t #{it}")
