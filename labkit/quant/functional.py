"""Autograd functions for fake quantization (stateless; modules own the state).

PACT fake quantization (facts §3), with ``eps = (hi - lo) / (n_levels - 1)``::

    q(x) = lo + eps * R((clamp(x, lo, hi) - lo) / eps),   R(z) = floor(z + 1/2)  (rounding)  or floor(z)

Regions: ``below`` x < lo, ``above`` x >= hi, ``inside`` lo <= x < hi (a partition, as in the PACT paper;
the single point x == hi counts as ``above``). Gradients (straight-through estimator)::

    dL/dx = g * inside,   dL/dhi = sum(g * above),   dL/dlo = sum(g * below)

summed down to the shape of ``lo`` / ``hi`` (a scalar, or one value per output channel).

TQT (arXiv 1903.08066): a trained ``log2_t``; scale ``s = 2^log2_t / D`` (continuous, as the reference
library) or ``s = 2^ceil(log2_t - log2 D)`` (``pow2``: the paper, ``2^ceil(log2 t) / 2^(b-1)`` signed and
``2^ceil(log2 t) / 2^b`` unsigned). Codes ``n..p`` and divisor ``D`` (:func:`tqt_code_range`, N = n_levels):
signed ``n = -floor(N/2)``, ``p = N - 1 + n``, ``D = floor(N/2)`` (t = -lo); unsigned ``n = 0``, ``p = N -
1``, ``D = N - 1`` continuous (t = hi, the reference's step t / (N - 1)) or ``D = N`` with ``pow2`` (the
paper)::

    q = s * clamp(R(x/s), n, p)
    dq/dx = 1 if n <= R(x/s) <= p else 0
    dq/dlog2_t = s ln2 (R(x/s) - x/s) inside,  s ln2 n below,  s ln2 p above

Regions are decided on the rounded code ``R(x/s)``, as in the paper: an x within half a step beyond a bound
rounds onto the grid's end code and counts as inside. (The reference library decides on x itself,
``x >= p s`` is above, so those elements get no x gradient and ``s ln2 p`` instead of ``s ln2 (p - x/s)``.)

The log2_t gradient is normalised (Adam-like, without momentum) by :func:`normalize_tqt_grad`:
``v <- beta v + (1 - beta) g^2``, ``g <- g / (sqrt(v / (1 - beta^k)) + 1e-12)`` then optionally ``tanh(g)``;
1e-12 only guards against 0 / 0 (the reference adds 1e-5, which shrinks the step of a threshold whose raw
gradient is not much larger than 1e-5: the normalisation is meant to make steps independent of the gradient's
scale). The training loop applies it right before the optimizer step
(:func:`labkit.quant.optimizers.normalize_tqt_grads`), not inside backward as the reference does (there the
gradients are final: accumulated, averaged by DDP, unscaled under AMP).

Without autograd (no input needs a gradient, or grad mode off: validation) ``pact_quantize`` /
``tqt_quantize`` run the forward kernel alone, without the region code and the rounding residual.

NaN inputs: the output is NaN at those positions and they contribute no gradient to x nor to the bounds.
Half-precision inputs are computed in float32; the output has the input's dtype.
"""

from __future__ import annotations

import math
import struct

import torch

EPS_MIN = 1e-8  # floor for eps: all-zero / constant tensors give a defined, finite grid
_LN2 = math.log(2.0)


def _work(x: torch.Tensor) -> torch.Tensor:
    """Half precision is computed in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _sum_to(t: torch.Tensor, meta: tuple) -> torch.Tensor:
    """Sum ``t`` down to ``meta = (shape, dtype)`` (the broadcast reduction of a bound's gradient)."""
    shape, dtype = meta
    return (t.sum_to_size(shape) if t.shape != shape else t).to(dtype)


def grid_eps(lo: torch.Tensor, hi: torch.Tensor, n_levels: int) -> torch.Tensor:
    """``eps = max((hi - lo) / (n_levels - 1), EPS_MIN)``."""
    return torch.clamp((hi - lo) / (n_levels - 1), min=EPS_MIN)


# ------------------------------------------------------------------------------------------------ fused
# kernels Forward computes the output in place in its own buffer plus a 1-byte region code per element, the
# only tensor PACT saves for backward (TQT adds the rounding residual): code = [x >= lo] + 2 [x < hi] (TQT: on
# the integer codes, [c >= n] + 2 [c <= p]); a NaN fails every comparison:
#     below = 2, inside = 3, above = 1, NaN = 0   (NaN: no gradient to x nor to any bound)
# Backward writes one region's 0/1 mask straight into a float scratch buffer (``eq(code, region, out=buf)``)
# and either multiplies it by g in place (the x gradient) or takes a dot product with g (a per-tensor bound's
# gradient; per-channel bounds: multiply and sum to the bound's shape). Comparisons write int8 or float, never
# bool: on CPU a bool result is several times slower (so are ``torch.where`` and bool masks). Per-tensor
# bounds enter the big elementwise ops as Python numbers on CPU (exactly the float32/float64 values of the
# bound tensors): cheaper than 0-dim tensors. A lower bound given as a number (unsigned: 0) needs no tensor.
BELOW, ABOVE, INSIDE = 2, 1, 3


def _region_code(t: torch.Tensor, lo, hi, upper=torch.lt) -> torch.Tensor:
    """int8 code ``[t >= lo] + 2 upper(t, hi)``."""
    code = torch.ge(t, lo, out=torch.empty_like(t, dtype=torch.int8))
    return code.add_(upper(t, hi, out=torch.empty_like(t, dtype=torch.int8)), alpha=2)


def _is_one(shape) -> bool:
    return all(d == 1 for d in shape)


def _f32(v: float) -> float:
    """Round a Python float to the nearest float32 (for +, -, *, / of float32 operands this gives exactly the
    float32 result: double rounding is harmless at 53 >= 2 * 24 + 2 bits)."""
    return _F32.unpack(_F32.pack(v))[0]


_F32 = struct.Struct("f")


def _cpu_scalar(x: torch.Tensor, *ts) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and \
        all(isinstance(t, float) or t.numel() == 1 for t in ts)


def _pact_params(x: torch.Tensor, lo, hi: torch.Tensor, n_levels: int):
    """``(lo, hi, eps)`` with ``eps = grid_eps(lo, hi)`` and ``hi`` raised to ``lo + EPS_MIN (n - 1)``.

    Per-tensor bounds on CPU come back as Python numbers, computed with exactly the float32 (float64)
    arithmetic of the tensor formulas: cheaper in the elementwise ops than 0-dim tensors, and no tensor ops
    for the scalars themselves. Elsewhere tensors (no host synchronisation on accelerators)."""
    tiny = EPS_MIN * (n_levels - 1)
    if _cpu_scalar(x, lo, hi):
        r = _f32 if x.dtype == torch.float32 else float
        lo_v, hi_v = (lo if isinstance(lo, float) else lo.item()), hi.item()
        eps = max(r(r(hi_v - lo_v) / (n_levels - 1)), r(EPS_MIN))
        return lo_v, max(hi_v, r(lo_v + r(tiny))), eps
    hi = hi.to(x.dtype)
    if isinstance(lo, float):
        return lo, hi.clamp(min=lo + tiny), grid_eps(lo, hi, n_levels)
    lo = lo.to(x.dtype)
    return lo, torch.maximum(hi, lo + tiny), grid_eps(lo, hi, n_levels)


def _masked_reduce(g: torch.Tensor, code: torch.Tensor, region: int, meta: tuple, buf: torch.Tensor):
    """``sum(g [code == region])`` reduced to ``meta = (shape, dtype)``; ``buf`` float scratch like g."""
    torch.eq(code, region, out=buf)
    shape, dtype = meta
    if _is_one(shape):
        if buf.is_contiguous() and g.is_contiguous() and buf.dtype == g.dtype:
            out = torch.dot(buf.view(-1), g.view(-1))
        else:
            out = buf.mul_(g).sum()
        return out.reshape(shape).to(dtype)
    return _sum_to(buf.mul_(g), meta)


def _pact_forward(x: torch.Tensor, lo, hi: torch.Tensor, n_levels: int, rounding: bool,
                  with_code: bool = True):
    """(q, code): ``q = lo + eps R((clamp(x, lo, hi) - lo) / eps)``, all in q's buffer (code None unless
    ``with_code``)."""
    lo, hi, eps = _pact_params(x, lo, hi, n_levels)
    code = _region_code(x, lo, hi) if with_code else None
    q = torch.clamp(x, lo, hi)
    shift = not (isinstance(lo, float) and lo == 0.0)  # unsigned activations: lo = 0, nothing to shift
    if shift:
        q.sub_(lo)
    q.div_(eps)
    if rounding:
        q.add_(0.5)
    q.floor_().mul_(eps)
    if shift:
        q.add_(lo)
    return q, code


def _pact_backward(g: torch.Tensor, code: torch.Tensor, lo_meta, hi_meta, need_x: bool, need_lo: bool,
                   need_hi: bool):
    gf = _work(g)
    buf = torch.empty_like(gf)
    glo = _masked_reduce(gf, code, BELOW, lo_meta, buf) if need_lo else None
    ghi = _masked_reduce(gf, code, ABOVE, hi_meta, buf) if need_hi else None
    gx = torch.eq(code, INSIDE, out=buf).mul_(gf) if need_x else None
    return (gx if gx is None or gx.dtype == g.dtype else gx.to(g.dtype)), glo, ghi


class PACTQuantFn(torch.autograd.Function):
    """Fake quantization on ``[lo, hi]`` with STE for x and PACT gradients for the bounds (see module doc).

    Fused: forward writes the output and a 1-byte region code (the only saved tensor); backward derives the
    x gradient and the bound reductions from that code in one scratch buffer (see the kernel notes above)."""

    @staticmethod
    def forward(ctx, x, lo, hi, n_levels: int, rounding: bool = True):
        q, code = _pact_forward(_work(x), lo, hi, n_levels, rounding)  # forward runs without autograd
        ctx.save_for_backward(code)
        ctx.lo_meta = None if isinstance(lo, float) else (lo.shape, lo.dtype)
        ctx.hi_meta = (hi.shape, hi.dtype)
        return q if q.dtype == x.dtype else q.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        gx, glo, ghi = _pact_backward(g, code, ctx.lo_meta, ctx.hi_meta, *ctx.needs_input_grad[:3])
        return gx, glo, ghi, None, None


def pact_quantize(x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor, n_levels: int,
                  rounding: bool = True) -> torch.Tensor:
    """Fake-quantize ``x`` on ``n_levels`` levels of ``[lo, hi]`` (bounds broadcast against x; ``lo`` may be a
    number: a fixed lower bound). Without autograd (no input needs a gradient, or grad mode off) the kernel
    runs alone: no region code, no autograd function."""
    if _channels_last(x, lo, hi):
        return pact_quantize(x.permute(0, 2, 3, 1), lo, hi, n_levels, rounding).permute(0, 3, 1, 2)
    if _tracked(x, lo, hi):
        return PACTQuantFn.apply(x, lo, hi, int(n_levels), bool(rounding))
    q = _pact_forward(_work(x), lo, hi, int(n_levels), bool(rounding), with_code=False)[0]
    return q if q.dtype == x.dtype else q.to(x.dtype)


def _tracked(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _channels_last(x: torch.Tensor, *bounds) -> bool:
    """``x`` is a channels_last (NHWC-dense) image batch and every bound one number: the kernels then run on
    ``x.permute(0, 2, 3, 1)``, a contiguous view (on CPU the comparisons into int8 buffers take a slow strided
    path on channels_last tensors: ~6x the time)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        and all(isinstance(b, float) or b.numel() == 1 for b in bounds)


def tqt_code_range(n_levels: int, signed: bool, pow2: bool = False) -> tuple[int, int, int]:
    """``(n, p, D)``: code range and threshold divisor, ``s = t / D`` (signed: n = -D, D = floor(N/2);
    unsigned: n = 0, D = N - 1, so that hi = t as in the reference, or D = N with ``pow2``, the paper's
    2^b)."""
    if signed:
        d = n_levels // 2
        return -d, n_levels - 1 - d, d
    return 0, n_levels - 1, n_levels if pow2 else n_levels - 1


def tqt_scale(log2_t: torch.Tensor, n_levels: int, signed: bool, pow2: bool) -> torch.Tensor:
    """``s = 2^log2_t / D`` or, with ``pow2``, ``s = 2^ceil(log2_t - log2 D)`` (exact power of two)."""
    _, _, d = tqt_code_range(n_levels, signed, pow2)
    if pow2:
        return torch.exp2(torch.ceil(log2_t - math.log2(d)))
    return torch.exp2(log2_t) / d


def normalize_tqt_grad(g: torch.Tensor, var: torch.Tensor, step: torch.Tensor, beta: float,
                       clip_grad: bool, ok: torch.Tensor | None = None) -> torch.Tensor:
    """Adam-like normalisation of a log2_t gradient; updates ``var`` and ``step`` in place:
    ``v <- beta v + (1 - beta) g^2; k <- k + 1; g / (sqrt(v / (1 - beta^k)) + 1e-12)``, then ``tanh`` if
    ``clip_grad``. A non-finite gradient (e.g. an overflowing AMP loss scale) passes through untouched and
    leaves the state alone (no host synchronisation). ``ok``: which elements count as finite (default: all of
    them iff every element of g is; several quantizers' concatenated gradients pass one flag per element)."""
    gd = g.detach().to(var.dtype)
    if ok is None:
        ok = torch.isfinite(gd).all()
    new_var = torch.where(ok, beta * var + (1.0 - beta) * gd ** 2, var)
    var.copy_(new_var)
    step.add_(ok.to(step.dtype))
    v_hat = var / (1.0 - beta ** step.clamp(min=1.0))
    out = gd / (torch.sqrt(v_hat) + 1e-12)
    if clip_grad:
        out = torch.tanh(out)
    return torch.where(ok, out, gd).to(g.dtype)


def _tqt_forward(x: torch.Tensor, s: torch.Tensor, n: int, p: int, rounding: bool, with_code: bool = True,
                 with_frac: bool = True):
    """(q, code, frac): codes ``c = R(x / s)``, ``q = s clamp(c, n, p)``, ``frac = c - x / s`` (0 at NaN/inf);
    code and frac None unless asked for."""
    if _cpu_scalar(x, s):
        s = s.item()
    frac = torch.div(x, s)
    if with_frac:
        q = torch.add(frac, 0.5) if rounding else frac.clone()
    else:
        q, frac = (frac.add_(0.5) if rounding else frac), None
    q.floor_()
    code = _region_code(q, n, p, torch.le) if with_code else None
    if with_frac:
        torch.sub(q, frac, out=frac).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    q.clamp_(n, p).mul_(s)
    return q, code, frac


def _tqt_backward(g: torch.Tensor, code: torch.Tensor, frac: torch.Tensor, s: torch.Tensor, n: int, p: int,
                  t_meta, need_x: bool, need_t: bool):
    """``dL/dx = g [inside]``; ``dL/dlog2_t = s ln2 (sum_in g frac + n sum_below g + p sum_above g)``."""
    gf = _work(g)
    buf = torch.empty_like(gf)
    gt = None
    if need_t:
        meta = (t_meta[0], gf.dtype)
        terms = [k * _masked_reduce(gf, code, region, meta, buf) for k, region in ((n, BELOW), (p, ABOVE))
                 if k]
    gin = torch.eq(code, INSIDE, out=buf).mul_(gf)  # g * [inside]
    if need_t:
        if _is_one(t_meta[0]) and gin.is_contiguous() and frac.is_contiguous() and gin.dtype == frac.dtype:
            inner = torch.dot(gin.view(-1), frac.view(-1)).reshape(t_meta[0])
        else:
            inner = _sum_to(gin * frac, meta)
        for term in terms:
            inner = inner + term
        gt = (inner * (s * _LN2)).to(t_meta[1])
    gx = (gin if gin.dtype == g.dtype else gin.to(g.dtype)) if need_x else None
    return gx, gt


class TQTQuantFn(torch.autograd.Function):
    """TQT fake quantization with the paper's log2_t gradient (see module doc).

    Fused like :class:`PACTQuantFn`: saves the 1-byte region code and the rounding residual ``c - x/s``."""

    @staticmethod
    def forward(ctx, x, log2_t, n_levels: int, signed: bool, pow2: bool, rounding: bool):
        n, p, _ = tqt_code_range(n_levels, signed)
        xf = _work(x)
        s = tqt_scale(log2_t.to(xf.dtype), n_levels, signed, pow2)  # forward runs without autograd
        q, code, frac = _tqt_forward(xf, s, n, p, rounding, with_frac=ctx.needs_input_grad[1])
        ctx.save_for_backward(code, frac, s)
        ctx.cfg = (n, p, (log2_t.shape, log2_t.dtype))
        return q if q.dtype == x.dtype else q.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        code, frac, s = ctx.saved_tensors
        n, p, t_meta = ctx.cfg
        gx, gt = _tqt_backward(g, code, frac, s, n, p, t_meta, *ctx.needs_input_grad[:2])
        return gx, gt, None, None, None, None


def tqt_quantize(x: torch.Tensor, log2_t: torch.Tensor, n_levels: int, signed: bool, pow2: bool = False,
                 rounding: bool = True) -> torch.Tensor:
    """TQT fake quantization with the raw log2_t gradient (normalised by :func:`normalize_tqt_grad`)."""
    if _channels_last(x, log2_t):
        return tqt_quantize(x.permute(0, 2, 3, 1), log2_t, n_levels, signed, pow2,
                            rounding).permute(0, 3, 1, 2)
    if _tracked(x, log2_t):
        return TQTQuantFn.apply(x, log2_t, int(n_levels), bool(signed), bool(pow2), bool(rounding))
    xf = _work(x)
    s = tqt_scale(log2_t.to(xf.dtype), n_levels, signed, pow2)
    n, p, _ = tqt_code_range(n_levels, signed)
    q = _tqt_forward(xf, s, n, p, rounding, with_code=False, with_frac=False)[0]
    return q if q.dtype == x.dtype else q.to(x.dtype)
