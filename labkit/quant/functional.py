"""Autograd functions for fake quantization (stateless; modules own the state).

PACT fake quantization (facts §3), with ``eps = (hi - lo) / (n_levels - 1)``::

    q(x) = lo + eps * R((clamp(x, lo, hi) - lo) / eps),   R(z) = floor(z + 1/2)  (rounding)  or floor(z)

Regions: ``below`` x < lo, ``above`` x >= hi, ``inside`` lo <= x < hi (a partition, as in the PACT paper;
the single point x == hi counts as ``above``). Gradients (straight-through estimator)::

    dL/dx = g * inside,   dL/dhi = sum(g * above),   dL/dlo = sum(g * below)

summed down to the shape of ``lo`` / ``hi`` (a scalar, or one value per output channel).

TQT (arXiv 1903.08066): a trained ``log2_t``; scale ``s = 2^log2_t / D`` (continuous, as the reference
library) or ``s = 2^ceil(log2_t - log2 D)`` (``pow2``: the paper; equals ``2^ceil(log2 t) / D`` when D is a
power of two). Codes ``n..p``: signed ``n = -floor(N/2)``, ``p = N - 1 + n``, ``D = floor(N/2)``; unsigned
``n = 0``, ``p = N - 1``, ``D = N`` (N = n_levels; N = 2^b gives the paper's grids)::

    q = s * clamp(R(x/s), n, p)
    dq/dx = 1 if n <= R(x/s) <= p else 0
    dq/dlog2_t = s ln2 (R(x/s) - x/s) inside,  s ln2 n below,  s ln2 p above

The log2_t gradient is normalised (Adam-like, without momentum) by :func:`normalize_tqt_grad`:
``v <- beta v + (1 - beta) g^2``, ``g <- g / (sqrt(v / (1 - beta^k)) + 1e-12)`` then optionally ``tanh(g)``;
the layers apply it right before the optimizer step (see :mod:`labkit.quant.modules`); ``tqt_quantize`` can
also apply it inside backward when given ``var``/``step`` (standalone use, not AMP-safe).

NaN inputs: the output is NaN at those positions and they contribute no gradient to x nor to the bounds.
Half-precision inputs are computed in float32; the output has the input's dtype.
"""

from __future__ import annotations

import math

import torch

EPS_MIN = 1e-8  # floor for eps: all-zero / constant tensors give a defined, finite grid
_LN2 = math.log(2.0)


def round_half_up(z: torch.Tensor) -> torch.Tensor:
    """``floor(z + 1/2)`` (ties away from -inf; matches an integer ``(acc + half) >> d`` requantization)."""
    return torch.floor(z + 0.5)


def _work(x: torch.Tensor) -> torch.Tensor:
    """Half precision is computed in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rnd(z: torch.Tensor, rounding: bool) -> torch.Tensor:
    return round_half_up(z) if rounding else torch.floor(z)


def _regions(x: torch.Tensor, below: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """int8 region code: 0 inside, -1 below, 1 above, 2 NaN."""
    r = above.to(torch.int8) - below.to(torch.int8)
    return r.masked_fill_(torch.isnan(x), 2)


def _sum_to(t: torch.Tensor, meta: tuple) -> torch.Tensor:
    """Sum ``t`` down to ``meta = (shape, dtype)`` (the broadcast reduction of a bound's gradient)."""
    shape, dtype = meta
    return (t.sum_to_size(shape) if t.shape != shape else t).to(dtype)


def grid_eps(lo: torch.Tensor, hi: torch.Tensor, n_levels: int) -> torch.Tensor:
    """``eps = max((hi - lo) / (n_levels - 1), EPS_MIN)``."""
    return torch.clamp((hi - lo) / (n_levels - 1), min=EPS_MIN)


class PACTQuantFn(torch.autograd.Function):
    """Fake quantization on ``[lo, hi]`` with STE for x and PACT gradients for the bounds (see module doc)."""

    @staticmethod
    def forward(ctx, x, lo, hi, n_levels: int, rounding: bool = True):
        xf = _work(x)
        lo_f, hi_f = lo.detach().to(xf.dtype), hi.detach().to(xf.dtype)
        eps = grid_eps(lo_f, hi_f, n_levels)
        hi_f = torch.maximum(hi_f, lo_f + EPS_MIN * (n_levels - 1))  # consistent with the eps floor
        below, above = xf < lo_f, xf >= hi_f
        ctx.save_for_backward(_regions(xf, below, above))
        ctx.lo_meta, ctx.hi_meta = (lo.shape, lo.dtype), (hi.shape, hi.dtype)
        q = lo_f + eps * _rnd((torch.minimum(torch.maximum(xf, lo_f), hi_f) - lo_f) / eps, rounding)
        return q.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        gx = glo = ghi = None
        if ctx.needs_input_grad[0]:
            gx = g * (r == 0)
        if ctx.needs_input_grad[1]:
            glo = _sum_to(_work(g) * (r == -1), ctx.lo_meta)
        if ctx.needs_input_grad[2]:
            ghi = _sum_to(_work(g) * (r == 1), ctx.hi_meta)
        return gx, glo, ghi, None, None


def pact_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_levels: int,
                  rounding: bool = True) -> torch.Tensor:
    """Fake-quantize ``x`` on ``n_levels`` levels of ``[lo, hi]`` (bounds broadcast against x)."""
    return PACTQuantFn.apply(x, lo, hi, int(n_levels), bool(rounding))


def tqt_code_range(n_levels: int, signed: bool) -> tuple[int, int, int]:
    """``(n, p, D)``: code range and threshold divisor (signed: D = floor(N/2), n = -D; unsigned: D = N, n = 0)."""
    if signed:
        d = n_levels // 2
        return -d, n_levels - 1 - d, d
    return 0, n_levels - 1, n_levels


def tqt_scale(log2_t: torch.Tensor, n_levels: int, signed: bool, pow2: bool) -> torch.Tensor:
    """``s = 2^log2_t / D`` or, with ``pow2``, ``s = 2^ceil(log2_t - log2 D)`` (exact power of two)."""
    _, _, d = tqt_code_range(n_levels, signed)
    if pow2:
        return torch.exp2(torch.ceil(log2_t - math.log2(d)))
    return torch.exp2(log2_t) / d


def normalize_tqt_grad(g: torch.Tensor, var: torch.Tensor, step: torch.Tensor, beta: float,
                       clip_grad: bool) -> torch.Tensor:
    """Adam-like normalisation of a log2_t gradient; updates ``var`` and ``step`` in place:
    ``v <- beta v + (1 - beta) g^2; k <- k + 1; g / (sqrt(v / (1 - beta^k)) + 1e-12)``, then ``tanh`` if
    ``clip_grad``. A non-finite gradient (e.g. an overflowing AMP loss scale) passes through untouched and
    leaves the state alone (no host synchronisation)."""
    gd = g.detach().to(var.dtype)
    ok = torch.isfinite(gd).all()
    new_var = torch.where(ok, beta * var + (1.0 - beta) * gd ** 2, var)
    var.copy_(new_var)
    step.add_(ok.to(step.dtype))
    v_hat = var / (1.0 - beta ** step.clamp(min=1.0))
    out = gd / (torch.sqrt(v_hat) + 1e-12)
    if clip_grad:
        out = torch.tanh(out)
    return torch.where(ok, out, gd).to(g.dtype)


class TQTQuantFn(torch.autograd.Function):
    """TQT fake quantization with the paper's log2_t gradient (see module doc)."""

    @staticmethod
    def forward(ctx, x, log2_t, n_levels: int, signed: bool, pow2: bool, rounding: bool,
                var, step, beta: float, clip_grad: bool, normalize: bool):
        n, p, _ = tqt_code_range(n_levels, signed)
        xf = _work(x)
        s = tqt_scale(log2_t.detach().to(xf.dtype), n_levels, signed, pow2)
        z = xf / s
        c = _rnd(z, rounding)
        r = _regions(xf, c < n, c > p)
        ctx.save_for_backward(r, c - z, s)
        ctx.state = (var, step)  # mutated in backward: not saved (no version check)
        ctx.cfg = (n, p, beta, clip_grad, normalize, (log2_t.shape, log2_t.dtype))
        return (s * torch.clamp(c, n, p)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        r, frac, s = ctx.saved_tensors
        var, step = ctx.state
        n, p, beta, clip_grad, normalize, t_meta = ctx.cfg
        gx = gt = None
        if ctx.needs_input_grad[0]:
            gx = g * (r == 0)
        if ctx.needs_input_grad[1]:
            gf = _work(g)
            local = torch.where(r == 0, frac, torch.where(r == -1, float(n), torch.where(r == 1, float(p), 0.0)))
            gt = _sum_to(gf * local * (s * _LN2), t_meta)
            if normalize:
                gt = normalize_tqt_grad(gt, var, step, beta, clip_grad)
        return gx, gt, None, None, None, None, None, None, None, None, None


def tqt_quantize(x: torch.Tensor, log2_t: torch.Tensor, n_levels: int, signed: bool, pow2: bool = False,
                 rounding: bool = True, var: torch.Tensor | None = None, step: torch.Tensor | None = None,
                 beta: float = 0.9, clip_grad: bool = True) -> torch.Tensor:
    """TQT fake quantization; ``var``/``step`` (shaped like log2_t / scalar) enable gradient normalisation."""
    normalize = var is not None and step is not None
    if not normalize:
        var = step = torch.zeros(())
    return TQTQuantFn.apply(x, log2_t, int(n_levels), bool(signed), bool(pow2), bool(rounding),
                            var, step, float(beta), bool(clip_grad), normalize)
