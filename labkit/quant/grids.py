"""The two bound representations a quantizer can hold (chosen once from its spec by :func:`make_grid`).

A grid keeps the constants of its spec and does the bound arithmetic; the bound tensors themselves are
registered on the owning quantizer ``q`` (state-dict keys ``conv1.clip_hi``, ``act1.log2_t``). Effective
bounds ``lo``/``hi`` and ``eps = (hi - lo) / (n_levels - 1)`` (floored at ``EPS_MIN``), n = n_levels:

  PACT, unsigned:           lo = 0, hi = ``clip_hi`` (PACT alpha)
  PACT, signed, ``symm``:   almost-symmetric, zero exact: lo = -m, eps = m / floor(n/2), hi = lo + (n-1) eps
                            with m = ``clip_hi`` (n = 256: codes -128..127, hi = 127/128 m)
  PACT, signed, asymmetric: lo = ``clip_lo``, hi = ``clip_hi``
  TQT:                      parameter ``log2_t``; scale s (:mod:`labkit.quant.functional`), lo = n s, hi = p s
                            (t = 2^log2_t is -lo when signed, hi when unsigned and not ``pow2``); symmetric
                            by design (``symm`` is ignored); buffers ``tqt_var``/``tqt_step`` hold the state
                            of its gradient normalisation (``labkit.quant.optimizers.normalize_tqt_grads``)

PACT bounds receive the PACT gradients, ``log2_t`` the paper's raw TQT gradient
(:mod:`labkit.quant.functional`).
Symmetric grids (``symmetric``) are set from a magnitude m = max(|lo|, |hi|) of a bound rule's range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from labkit.config.spec import QuantSpec
from labkit.quant.functional import EPS_MIN, pact_quantize, tqt_code_range, tqt_quantize, tqt_scale


def make_grid(spec: QuantSpec, shape: tuple = ()) -> _Grid:
    """The grid of ``spec`` for bounds of ``shape`` (``()`` per tensor, ``(C, 1, ...)`` per channel)."""
    if spec.tqt:
        return TQTGrid(spec, shape)
    if not spec.signed:
        return UnsignedPACT(spec, shape)
    return SymmetricPACT(spec, shape) if spec.symm else AsymmetricPACT(spec, shape)


def _magnitude(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.maximum(lo.abs(), hi.abs())


class _Grid:
    symmetric = False
    param_names: tuple[str, ...] = ()

    def __init__(self, spec: QuantSpec, shape: tuple):
        self.shape, self.n_levels, self.rounding = tuple(shape), spec.n_levels, spec.rounding
        self.tiny = EPS_MIN * (spec.n_levels - 1)  # hi - lo below this would floor eps

    def _param(self, q: nn.Module, name: str, value: float, learn: bool) -> None:
        q.register_parameter(name, nn.Parameter(torch.full(self.shape, value), requires_grad=learn))

    def _fit(self, t: torch.Tensor) -> torch.Tensor:
        """A rule's bound (a scalar or one value per channel) as float32 in the bounds' shape."""
        return t.float().reshape(self.shape if t.numel() > 1 else ())

    def store(self, q: nn.Module, lo: torch.Tensor, hi: torch.Tensor, keep_state: bool = False) -> None:
        """Bound parameters from a rule's raw (lo, hi); symmetric grids take m = max(|lo|, |hi|)."""
        self.store_magnitude(q, _magnitude(self._fit(lo), self._fit(hi)), keep_state)

    def eps(self, q: nn.Module) -> torch.Tensor:
        lo, hi = self.bounds(q)
        return torch.clamp((hi - lo) / (self.n_levels - 1), min=EPS_MIN)

    def summary(self, q: nn.Module) -> dict[str, torch.Tensor]:
        """Values reported besides lo / hi / eps."""
        return {}

    def describe(self) -> str:
        return ""


class _PACTGrid(_Grid):
    param_names = ("clip_hi",)

    def __init__(self, spec: QuantSpec, shape: tuple):
        super().__init__(spec, shape)
        self.noisy = spec.noisy

    def fake_quant(self, q: nn.Module, x: torch.Tensor, trainable: bool) -> torch.Tensor:
        lo, hi = self.quant_bounds(q, trainable)
        if self.noisy and q.training:  # dithering: uniform noise of one step, centred
            eps = torch.clamp((hi - lo).detach() / (self.n_levels - 1), min=EPS_MIN)
            x = x + (torch.rand_like(x) - 0.5) * eps.to(x.dtype)
        return pact_quantize(x, lo, hi, self.n_levels, self.rounding)

    @staticmethod
    def _hi(q: nn.Module, trainable: bool) -> torch.Tensor:
        return q.clip_hi if trainable else q.clip_hi.detach()

    def quant_bounds(self, q: nn.Module, trainable: bool) -> tuple[torch.Tensor | float, torch.Tensor]:
        """The bounds fake quantization takes (a fixed bound may be a number)."""
        return self.bounds(q, trainable)


class UnsignedPACT(_PACTGrid):
    def create(self, q: nn.Module, spec: QuantSpec) -> None:
        self._param(q, "clip_hi", spec.init_clip_hi, spec.learn_clip)

    def bounds(self, q: nn.Module, trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        hi = self._hi(q, trainable)
        return torch.zeros_like(hi), hi

    def quant_bounds(self, q: nn.Module, trainable: bool) -> tuple[float, torch.Tensor]:
        return 0.0, self._hi(q, trainable)

    def store(self, q: nn.Module, lo: torch.Tensor, hi: torch.Tensor, keep_state: bool = False) -> None:
        q.clip_hi.copy_(self._fit(hi).clamp(min=self.tiny).expand(self.shape))

    def set_eps(self, q: nn.Module, eps: torch.Tensor) -> None:
        q.clip_hi.copy_((eps * (self.n_levels - 1)).expand(self.shape))


class SymmetricPACT(_PACTGrid):
    symmetric = True

    def create(self, q: nn.Module, spec: QuantSpec) -> None:
        self._param(q, "clip_hi", max(abs(spec.init_clip_lo), abs(spec.init_clip_hi)), spec.learn_clip)

    def bounds(self, q: nn.Module, trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        m, d = self._hi(q, trainable), self.n_levels // 2
        return -m, m * ((self.n_levels - 1 - d) / d)

    def store_magnitude(self, q: nn.Module, m: torch.Tensor, keep_state: bool = False) -> None:
        q.clip_hi.copy_(m.clamp(min=self.tiny).expand(self.shape))

    def store_magnitudes(self, qs: list[nn.Module], ms: list[torch.Tensor]) -> None:
        """:meth:`store_magnitude` of quantizers with this grid's kind and ``n_levels`` (``ms`` one per
        quantizer, one value per bound; overwritten), one foreach op per step."""
        torch._foreach_clamp_min_(ms, self.tiny)
        torch._foreach_copy_([q.clip_hi.view(m.shape) for q, m in zip(qs, ms)], ms)

    def set_eps(self, q: nn.Module, eps: torch.Tensor) -> None:
        q.clip_hi.copy_((eps * (self.n_levels // 2)).expand(self.shape))


class AsymmetricPACT(_PACTGrid):
    param_names = ("clip_lo", "clip_hi")

    def create(self, q: nn.Module, spec: QuantSpec) -> None:
        self._param(q, "clip_hi", spec.init_clip_hi, spec.learn_clip)
        self._param(q, "clip_lo", spec.init_clip_lo, spec.learn_clip)

    def bounds(self, q: nn.Module, trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return (q.clip_lo if trainable else q.clip_lo.detach()), self._hi(q, trainable)

    def store(self, q: nn.Module, lo: torch.Tensor, hi: torch.Tensor, keep_state: bool = False) -> None:
        lo, hi = self._fit(lo), self._fit(hi)
        q.clip_lo.copy_(lo.expand(self.shape))
        q.clip_hi.copy_(torch.maximum(hi, lo + self.tiny).expand(self.shape))

    def set_eps(self, q: nn.Module, eps: torch.Tensor) -> None:
        q.clip_hi.copy_(q.clip_lo + eps * (self.n_levels - 1))


class TQTGrid(_Grid):
    """Scale ``s = 2^log2_t / D`` (``pow2``: ``2^ceil(log2_t - log2 D)``), codes ``n..p``."""

    param_names = ("log2_t",)

    def __init__(self, spec: QuantSpec, shape: tuple):
        super().__init__(spec, shape)
        self.signed, self.pow2 = spec.signed, spec.pow2
        self.symmetric = spec.signed
        self.n, self.p, _ = tqt_code_range(spec.n_levels, spec.signed)
        self.d = tqt_code_range(spec.n_levels, spec.signed, spec.pow2)[2]

    def create(self, q: nn.Module, spec: QuantSpec) -> None:
        self._param(q, "log2_t", math.log2(max(abs(spec.init_clip_hi), 1e-6)), spec.learn_clip)
        q.register_buffer("tqt_var", torch.zeros(self.shape))
        q.register_buffer("tqt_step", torch.zeros(()))

    def scale(self, q: nn.Module) -> torch.Tensor:
        return tqt_scale(q.log2_t.detach(), self.n_levels, self.signed, self.pow2)

    def bounds(self, q: nn.Module, trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale(q)
        return self.n * s, self.p * s

    def eps(self, q: nn.Module) -> torch.Tensor:
        return self.scale(q)

    def fake_quant(self, q: nn.Module, x: torch.Tensor, trainable: bool) -> torch.Tensor:
        # the paper's raw gradient here; normalised before the optimizer step (normalize_tqt_grads)
        log2_t = q.log2_t if trainable else q.log2_t.detach()
        return tqt_quantize(x, log2_t, self.n_levels, self.signed, self.pow2, self.rounding)

    def store(self, q: nn.Module, lo: torch.Tensor, hi: torch.Tensor, keep_state: bool = False) -> None:
        """t = hi (unsigned) or max(|lo|, |hi|); restarts the gradient normalisation unless ``keep_state``."""
        if self.signed:
            super().store(q, lo, hi, keep_state)
        else:
            self.store_magnitude(q, self._fit(hi), keep_state)

    def store_magnitude(self, q: nn.Module, t: torch.Tensor, keep_state: bool = False) -> None:
        q.log2_t.copy_(torch.log2(t.clamp(min=self.tiny)).expand(self.shape))
        if not keep_state:
            q.tqt_var.zero_()
            q.tqt_step.zero_()

    def store_magnitudes(self, qs: list[nn.Module], ts: list[torch.Tensor]) -> None:
        """:meth:`store_magnitude` (``keep_state``) of several quantizers, as for the symmetric PACT grid."""
        torch._foreach_clamp_min_(ts, self.tiny)
        torch._foreach_log2_(ts)
        torch._foreach_copy_([q.log2_t.view(t.shape) for q, t in zip(qs, ts)], ts)

    def set_eps(self, q: nn.Module, eps: torch.Tensor) -> None:
        """log2 t = log2(eps D); ``pow2`` lands strictly inside (k - 1, k] so that ceil() gives log2 eps."""
        if self.pow2:
            k = torch.ceil(torch.log2(eps) - 1e-6)
            q.log2_t.copy_((k + math.log2(self.d) - 0.5).expand(self.shape))
        else:
            q.log2_t.copy_(torch.log2(eps * self.d).expand(self.shape))

    def summary(self, q: nn.Module) -> dict[str, torch.Tensor]:
        return {"log2_t": q.log2_t}

    def describe(self) -> str:
        return f", tqt=True, pow2={self.pow2}"
