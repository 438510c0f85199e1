"""Clip-bound initialisation rules (facts §3).

Weights (computed from the tensor at ``start``; per layer, or per output channel = dim 0):
  ``max``        lo = min w, hi = max w (symmetric quantizers use m = max |w|)
  ``std``        mean -/+ nb_std * std (unbiased; symmetric: m = max(|mean - k std|, |mean + k std|))
  ``sawb_symm``  m = c1 sqrt(E[w^2]) - c2 E|w| with the symmetric-range coefficients (the quantizer puts m on
                 its almost-symmetric grid, see :mod:`labkit.quant.base`)
  ``sawb_asymm`` the same with the almost-symmetric-range coefficients (odd n_levels: the only column)
  ``const``      [init_clip_lo, init_clip_hi]
SAWB falls back to max |w| wherever alpha* <= 0. Above 16 levels it also falls back wherever max |w| quantizes
the weights with a lower mean squared error on the quantizer's grid (:func:`grid_mse`): there c2 / c1 > 1.02,
so the fit, a difference of two large terms, collapses to 0 as sqrt(E[w^2]) / E|w| (>= 1) falls to c2 / c1
(1.154 at 256 levels; a uniform distribution has 1.155) and clips light-tailed channels to a fraction of their
range. At 16 levels and below c2 / c1 <= 1.003 and the fit is kept, as the reference keeps it everywhere.

Activations (from statistics gathered in training mode before ``start``):
  ``max`` EMA of the batch min / max (unsigned: hi only); ``std`` mean -/+ nb_std * std (EMAs of the batch
  mean and unbiased variance); ``percentile`` EMA of the batch ``100 - percentile`` / ``percentile``
  percentiles (linear interpolation); ``const`` [init_clip_lo, init_clip_hi] (unsigned: [0, init_clip_hi]).
  Every EMA starts from the first batch's value. (The reference starts its mean / variance EMAs from 0 / 1,
  as batch norm does: after k batches that data-independent prior still weighs (1 - momentum)^k, 73% after
  three batches, which pulls the ``std`` bound towards 0 + nb_std.)
Signed symmetric quantizers take m = max(|lo|, |hi|); TQT takes t = hi (unsigned) or max(|lo|, |hi|).
"""

from __future__ import annotations

import math

import torch

from labkit.config.spec import ACT_INIT_MODES, WEIGHT_INIT_MODES
from labkit.quant.functional import pact_quantize

# n_levels -> ((c1, c2) symmetric range, (c1, c2) almost-symmetric range or None for odd n_levels)
SAWB_COEFFS: dict[int, tuple[tuple[float, float], tuple[float, float] | None]] = {
    3: ((2.58072, 1.68371), None),
    4: ((3.22824, 2.19780), (4.74932, 3.32860)),
    7: ((6.99146, 6.34798), None),
    8: ((7.57111, 6.96333), (8.26900, 7.36509)),
    15: ((12.04287, 12.07040), None),
    16: ((12.16637, 12.19222), (12.06485, 11.86833)),
    31: ((14.71474, 15.13775), None),
    32: ((15.18684, 15.72128), (15.47646, 15.98616)),
    63: ((20.78714, 22.60234), None),
    64: ((20.54678, 22.29264), (21.96366, 24.03408)),
    127: ((27.15792, 30.50641), None),
    128: ((27.75226, 31.25157), (28.26410, 31.87972)),
    255: ((35.48044, 40.89530), None),
    256: ((34.97231, 40.26019), (36.15292, 41.73554)),
}

#: above this many levels SAWB's fit is checked against max |w| by the grid's mean squared error
SAWB_GUARD_ABOVE = 16

#: weight modes whose symmetric bound :func:`weight_magnitude` computes directly
MAGNITUDE_MODES = ("max", "sawb_symm", "sawb_asymm")

# statistics sampled per batch for the percentile rule (strided subsample; no RNG draws)
PERCENTILE_SAMPLES = 1 << 16


def check_mode(mode: str, allowed: tuple[str, ...], what: str) -> str:
    if mode not in allowed:
        raise ValueError(f"init_clip={mode!r} is not a valid {what} init mode; allowed: {', '.join(allowed)}")
    return mode


def sawb_coefficients(n_levels: int, mode: str = "sawb_asymm") -> tuple[float, float]:
    """``(c1, c2)`` for ``n_levels``; ``mode`` ``sawb_symm`` or ``sawb_asymm`` picks the column."""
    if n_levels not in SAWB_COEFFS:
        raise ValueError(f"no SAWB coefficients for n_levels={n_levels}; available: {sorted(SAWB_COEFFS)} "
                         f"(use init_clip 'max' or 'std' instead)")
    symm, asymm = SAWB_COEFFS[n_levels]
    return asymm if (mode == "sawb_asymm" and asymm is not None) else symm


def _reduce_dims(w: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))


def sawb_clip(w: torch.Tensor, n_levels: int, mode: str = "sawb_asymm",
              per_channel: bool = False) -> torch.Tensor:
    """``alpha* = c1 sqrt(E[w^2]) - c2 E|w|`` (per output channel if asked); max |w| where alpha* <= 0 and,
    above ``SAWB_GUARD_ABOVE`` levels, where max |w| gives the lower :func:`grid_mse`."""
    dims = _reduce_dims(w, per_channel)
    wf = w.detach().float()
    a = wf.abs()
    amax = a.amax(dim=dims)
    alpha = _sawb_fit(a, n_levels, mode, dims)
    alpha = torch.where(alpha > 0, alpha, amax)
    if n_levels <= SAWB_GUARD_ABOVE:
        return alpha
    return torch.where(grid_mse(wf, alpha, n_levels, dims) <= grid_mse(wf, amax, n_levels, dims), alpha, amax)


def sawb_alpha(w: torch.Tensor, n_levels: int, mode: str = "sawb_asymm",
               per_channel: bool = False) -> torch.Tensor:
    """The fit alone: ``alpha* = c1 sqrt(E[w^2]) - c2 E|w|`` (per output channel if asked; may be <= 0)."""
    return _sawb_fit(w.detach().float().abs(), n_levels, mode, _reduce_dims(w, per_channel))


def _sawb_fit(a: torch.Tensor, n_levels: int, mode: str, dims: tuple[int, ...]) -> torch.Tensor:
    c1, c2 = sawb_coefficients(n_levels, mode)
    return c1 * torch.sqrt((a * a).mean(dim=dims)) - c2 * a.mean(dim=dims)


def grid_mse(w: torch.Tensor, m: torch.Tensor, n_levels: int, dims: tuple[int, ...]) -> torch.Tensor:
    """``E[(q(w) - w)^2]`` over ``dims``, ``q`` the quantizer's own PACT grid for bound ``m`` (shape of the
    reduction): almost symmetric, ``lo = -m``, ``eps = m / floor(n/2)``, ``hi = lo + (n - 1) eps``."""
    lo = -m.clamp_min(torch.finfo(m.dtype).tiny).reshape(m.shape + (1,) * (w.dim() - m.dim()))
    hi = lo + (n_levels - 1) * (-lo / (n_levels // 2))
    return (pact_quantize(w, lo, hi, n_levels) - w).square_().mean(dim=dims)


def weight_magnitude(w: torch.Tensor, mode: str, n_levels: int, per_channel: bool = False) -> torch.Tensor:
    """``m = max(|lo|, |hi|)`` of :func:`weight_clip` for ``max`` (max |w|) and the SAWB modes, in a few
    tensor ops (the symmetric bound that weight quantizers re-derive before every batch)."""
    if mode == "max":
        return w.detach().float().abs().amax(dim=_reduce_dims(w, per_channel))
    return sawb_clip(w, n_levels, mode, per_channel)


def weight_clip(w: torch.Tensor, mode: str, n_levels: int, per_channel: bool = False, nb_std: float = 3.0,
                init_clip_lo: float = -1.0, init_clip_hi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(lo, hi)`` for a weight tensor (shape ``()`` or ``(C_out,)``); symmetric rules give lo = -hi."""
    check_mode(mode, WEIGHT_INIT_MODES, "weight")
    dims = _reduce_dims(w, per_channel)
    wf = w.detach().float()
    if mode == "max":
        return wf.amin(dim=dims), wf.amax(dim=dims)
    if mode == "std":
        count = math.prod(wf.shape[d] for d in dims)
        mean, std = wf.mean(dim=dims), wf.std(dim=dims, correction=1 if count > 1 else 0)
        return mean - nb_std * std, mean + nb_std * std
    if mode in ("sawb_symm", "sawb_asymm"):
        a = sawb_clip(w, n_levels, mode, per_channel)
        return -a, a
    shape = wf.amax(dim=dims).shape
    return torch.full(shape, float(init_clip_lo)), torch.full(shape, float(init_clip_hi))


#: the running statistics of an activation quantizer, and those each init rule reads
STAT_NAMES = ("running_min", "running_max", "running_mean", "running_var", "running_pct_lo", "running_pct_hi")
STATS_OF_MODE = {"max": STAT_NAMES[:2], "std": STAT_NAMES[2:4], "percentile": STAT_NAMES[4:], "const": ()}


def update_act_stats(stats: dict[str, torch.Tensor], x: torch.Tensor, momentum: float, percentile: float,
                     mode: str | None = None) -> None:
    """EMA (``new = (1 - momentum) old + momentum batch``; the first batch is copied) of the statistics the
    init rule ``mode`` reads (all when None): batch min and max, mean and unbiased variance, the
    ``100 - percentile`` / ``percentile`` percentiles (of a strided subsample of at most
    ``PERCENTILE_SAMPLES`` values); counts the batch in ``n_stat_batches``. NaN values are ignored (an
    all-NaN batch makes the statistics NaN, and a later ``start`` then raises). In place, without host
    synchronisation on accelerators."""
    xf = x.detach().float().reshape(-1)
    names = STAT_NAMES if mode is None else STATS_OF_MODE[mode]
    if xf.numel() == 0:
        return
    first = stats["n_stat_batches"] == 0
    for k, v in _batch_stats(xf, names, percentile).items():
        stats[k].copy_(torch.where(first, v, (1.0 - momentum) * stats[k] + momentum * v))
    stats["n_stat_batches"].add_(1)


def _batch_stats(xf: torch.Tensor, names: tuple[str, ...], percentile: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if not names:
        return out
    nan = None  # the NaN mask (slow: bool), built only where a NaN may be: on CPU a min of NaN tells
    if xf.device.type == "cpu":
        mn, mx = torch.aminmax(xf)
        count = torch.tensor(xf.numel())
    if xf.device.type != "cpu" or bool(mn.isnan()):
        nan = torch.isnan(xf)
        mn, mx = torch.where(nan, torch.inf, xf).amin(), torch.where(nan, -torch.inf, xf).amax()
        count = (~nan).sum()
    out.update(running_min=mn, running_max=mx)
    if "running_mean" in names:
        mean = torch.nanmean(xf) if nan is not None else torch.nansum(xf) / xf.numel()  # nanmean's formula
        dev = (xf - mean).square_()  # = ** 2, several times faster
        out.update(running_mean=mean, running_var=torch.nansum(dev) / (count - 1).clamp(min=1))
    if "running_pct_lo" in names:
        sub = xf[:: max(1, xf.numel() // PERCENTILE_SAMPLES)]
        q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], device=xf.device)
        pct = torch.nanquantile(sub, q)
        out.update(running_pct_lo=pct[0], running_pct_hi=pct[1])
    return {k: out[k] for k in names}


def act_clip(stats: dict[str, torch.Tensor], mode: str, nb_std: float = 3.0, init_clip_lo: float = -6.0,
             init_clip_hi: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(lo, hi)`` scalars from gathered statistics (``const`` needs none)."""
    check_mode(mode, ACT_INIT_MODES, "activation")
    if mode == "const":
        return torch.tensor(float(init_clip_lo)), torch.tensor(float(init_clip_hi))
    if mode == "max":
        lo, hi = stats["running_min"], stats["running_max"]
    elif mode == "std":
        mean, std = stats["running_mean"], stats["running_var"].clamp(min=0).sqrt()
        lo, hi = mean - nb_std * std, mean + nb_std * std
    else:
        lo, hi = stats["running_pct_lo"], stats["running_pct_hi"]
    lo, hi = lo.detach().float().clone(), hi.detach().float().clone()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"init_clip={mode!r}: gathered statistics are not finite (lo={float(lo)}, "
                         f"hi={float(hi)}); the network produced inf/NaN activations before start")
    return lo, hi
