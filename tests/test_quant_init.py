"""Clip initialisation rules: SAWB table and fall-back, weight modes, activation statistics (facts §3)."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.quant import init as qinit

pytestmark = pytest.mark.usefixtures("one_thread")

# (n_levels, symmetric (c1, c2), almost-symmetric (c1, c2)) transcribed from facts §3
TABLE = [
    (3, (2.58072, 1.68371), None), (4, (3.22824, 2.19780), (4.74932, 3.32860)),
    (8, (7.57111, 6.96333), (8.26900, 7.36509)), (15, (12.04287, 12.07040), None),
    (16, (12.16637, 12.19222), (12.06485, 11.86833)), (64, (20.54678, 22.29264), (21.96366, 24.03408)),
    (255, (35.48044, 40.89530), None), (256, (34.97231, 40.26019), (36.15292, 41.73554)),
]


@pytest.mark.parametrize("n,symm,asymm", TABLE)
def test_sawb_values_against_table(n, symm, asymm):
    torch.manual_seed(n)
    # a heavy-tailed weight tensor (Laplace-like) so that alpha* > 0 for every table entry
    w = torch.distributions.Laplace(0.0, 0.05).sample((64, 32, 3, 3)) * (1 + torch.rand(64, 1, 1, 1))
    for mode, (c1, c2) in (("sawb_symm", symm), ("sawb_asymm", asymm or symm)):
        expect = c1 * math.sqrt((w.double() ** 2).mean().item()) - c2 * w.double().abs().mean().item()
        alpha = qinit.sawb_alpha(w, n, mode).item()
        assert expect > 0
        assert alpha == pytest.approx(expect, rel=1e-4)
        clip = qinit.sawb_clip(w, n, mode).item()
        if n <= qinit.SAWB_GUARD_ABOVE:
            assert clip == alpha
        else:  # the fit, or max |w| where that quantizes with the lower grid MSE
            assert clip in (alpha, w.abs().max().item())
        lo, hi = qinit.weight_clip(w, mode, n)
        assert lo.item() == -hi.item() == -clip


def test_sawb_per_channel_and_fallback():
    # channel 0: Gaussian (alpha* > 0 for n = 16); channel 1: +-1 only, so sqrt(E w^2) = E|w| and for n = 256
    # alpha* = c1 - c2 < 0 -> falls back to max |w| = 1
    w = torch.stack([torch.randn(400), torch.sign(torch.randn(400))])
    a16 = qinit.sawb_clip(w, 16, "sawb_symm", per_channel=True)
    c1, c2 = 12.16637, 12.19222
    e0 = c1 * w[0].pow(2).mean().sqrt() - c2 * w[0].abs().mean()
    assert a16.shape == (2,)
    assert a16[0].item() == pytest.approx(e0.item(), rel=1e-5)
    a256 = qinit.sawb_clip(w, 256, "sawb_symm", per_channel=True)
    assert 34.97231 - 40.26019 < 0
    assert a256[1].item() == 1.0
    # all-zero weights: alpha* = 0 -> max |w| = 0 (the quantizer floors eps)
    assert qinit.sawb_clip(torch.zeros(10), 256).item() == 0.0


def test_sawb_above_16_levels_keeps_the_fit_only_where_it_quantizes_better_than_max():
    """A light-tailed channel (uniform: sqrt(E w^2) / E|w| = 1.155, just above c2 / c1 = 1.154 at 256 levels)
    gets a fit of a few percent of max |w|; the guard takes max |w|, with a far lower error on the quantizer's
    own grid. A large Gaussian channel with one far outlier keeps the fit (clipping one value costs less than
    a 50x coarser grid). At 16 levels the fit is kept as it is."""
    torch.manual_seed(0)
    uniform = torch.linspace(-1, 1, 10 ** 6)
    heavy = torch.randn(10 ** 6)
    heavy[0] = 50.0
    w = torch.stack([uniform, heavy])
    fit = qinit.sawb_alpha(w, 256, "sawb_asymm", per_channel=True)
    assert 0 < fit[0] < 0.05 * uniform.abs().max()
    clip = qinit.sawb_clip(w, 256, "sawb_asymm", per_channel=True)
    assert clip[0] == 1.0 and clip[1] == fit[1] < heavy.abs().max()
    # grid_mse against the grid's formula in float64: eps = m / 128, codes -128 .. 127
    u64 = uniform.double()
    for m in (fit[0], clip[0], fit[1]):
        eps = float(m) / 128
        direct = ((torch.floor(u64 / eps + 0.5).clamp(-128, 127) * eps - u64) ** 2).mean()
        assert qinit.grid_mse(uniform, torch.as_tensor(m), 256, (0,)) == pytest.approx(direct.item(),
                                                                                       rel=1e-3)
    mse = [qinit.grid_mse(uniform, torch.as_tensor(m), 256, (0,)).item() for m in (fit[0], clip[0])]
    assert mse[1] < mse[0] / 1000
    assert torch.equal(qinit.sawb_clip(w, 16, "sawb_asymm", per_channel=True),
                       torch.where(qinit.sawb_alpha(w, 16, "sawb_asymm", per_channel=True) > 0,
                                   qinit.sawb_alpha(w, 16, "sawb_asymm", per_channel=True), w.abs().amax(1)))


def test_sawb_unknown_n_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="n_levels=5.*available"):
        qinit.sawb_coefficients(5)


def test_weight_clip_modes():
    w = torch.randn(6, 20)
    lo, hi = qinit.weight_clip(w, "max", 256, per_channel=True)
    torch.testing.assert_close(hi, w.amax(1))
    torch.testing.assert_close(lo, w.amin(1))
    lo, hi = qinit.weight_clip(w, "std", 256, nb_std=2)
    assert hi.item() == pytest.approx((w.mean() + 2 * w.std()).item(), rel=1e-5)
    assert lo.item() == pytest.approx((w.mean() - 2 * w.std()).item(), rel=1e-5)
    lo, hi = qinit.weight_clip(w, "const", 256, per_channel=True, init_clip_lo=-0.5, init_clip_hi=0.25)
    assert lo.shape == (6,) and (lo == -0.5).all() and (hi == 0.25).all()
    with pytest.raises(ValueError, match="percentile.*allowed: max, std, sawb_symm, sawb_asymm, const"):
        qinit.weight_clip(w, "percentile", 256)


def _fresh_stats():
    s = {n: torch.zeros(()) for n in ("running_min", "running_max", "running_mean", "running_var",
                                       "running_pct_lo", "running_pct_hi")}
    s["n_stat_batches"] = torch.zeros((), dtype=torch.long)
    return s


def test_activation_stats_ema_and_modes():
    s = _fresh_stats()
    x1, x2 = torch.randn(10000), torch.randn(10000) * 2 + 1
    qinit.update_act_stats(s, x1, momentum=0.1, percentile=99.0)
    assert s["running_max"].item() == x1.max().item() and s["n_stat_batches"].item() == 1
    qinit.update_act_stats(s, x2, momentum=0.1, percentile=99.0)
    assert s["running_max"].item() == pytest.approx(0.9 * x1.max().item() + 0.1 * x2.max().item(), rel=1e-6)
    assert s["running_min"].item() == pytest.approx(0.9 * x1.min().item() + 0.1 * x2.min().item(), rel=1e-6)
    mean = 0.9 * x1.mean() + 0.1 * x2.mean()
    var = 0.9 * x1.var() + 0.1 * x2.var()
    assert s["running_mean"].item() == pytest.approx(mean.item(), rel=1e-5, abs=1e-6)
    p_hi = 0.9 * torch.quantile(x1, 0.99) + 0.1 * torch.quantile(x2, 0.99)
    assert s["running_pct_hi"].item() == pytest.approx(p_hi.item(), rel=1e-5)

    lo, hi = qinit.act_clip(s, "max")
    assert hi.item() == s["running_max"].item()
    lo, hi = qinit.act_clip(s, "std", nb_std=3)
    assert hi.item() == pytest.approx((mean + 3 * var.sqrt()).item(), rel=1e-5)
    lo, hi = qinit.act_clip(s, "percentile")
    assert lo.item() == s["running_pct_lo"].item() < 0 < hi.item() == s["running_pct_hi"].item()
    lo, hi = qinit.act_clip(s, "const", init_clip_lo=-2, init_clip_hi=6)
    assert (lo.item(), hi.item()) == (-2.0, 6.0)


def test_statistics_follow_the_init_rule_and_equal_the_nan_aware_formulas():
    x = torch.randn(3, 7, 9, 9) * 2 + 0.3  # no NaN: update_act_stats takes its fast path on CPU
    xf = x.reshape(-1)
    nan, mean = torch.isnan(xf), torch.nanmean(xf)
    pct = torch.nanquantile(xf, torch.tensor([0.01, 0.99]))
    expect = {"running_min": torch.where(nan, torch.inf, xf).amin(),
              "running_max": torch.where(nan, -torch.inf, xf).amax(),
              "running_mean": mean, "running_var": torch.nansum((xf - mean) ** 2) / ((~nan).sum() - 1),
              "running_pct_lo": pct[0], "running_pct_hi": pct[1]}
    for mode, names in qinit.STATS_OF_MODE.items():
        s = _fresh_stats()
        qinit.update_act_stats(s, x, 0.1, 99.0, mode)
        assert s["n_stat_batches"].item() == 1
        for k in qinit.STAT_NAMES:  # const gathers nothing; the others exactly what their rule reads
            assert torch.equal(s[k], expect[k] if k in names else torch.zeros(())), (mode, k)


def test_activation_stats_ignore_nan_and_reject_all_nan():
    s = _fresh_stats()
    x = torch.tensor([1.0, float("nan"), 3.0])
    qinit.update_act_stats(s, x, 0.1, 99.0)
    assert s["running_max"].item() == 3.0 and s["running_mean"].item() == 2.0
    s2 = _fresh_stats()
    qinit.update_act_stats(s2, torch.full((4,), float("nan")), 0.1, 99.0)
    with pytest.raises(ValueError, match="not finite"):
        qinit.act_clip(s2, "max")


def test_percentile_subsample_bounded():
    s = _fresh_stats()
    x = torch.rand(qinit.PERCENTILE_SAMPLES * 4 + 3)
    qinit.update_act_stats(s, x, 0.1, 99.9)
    assert s["running_pct_hi"].item() == pytest.approx(0.999, abs=2e-3)
    assert s["running_pct_lo"].item() == pytest.approx(0.001, abs=2e-3)
