"""What every quantizer shares: settings (a :class:`~labkit.quant.spec.QuantSpec`), state, bounds, commands.

Two states kept in persistent buffers (``started_flag``, ``frozen_flag``): before ``start`` a quantizer runs
in float (activations also gather statistics in training mode); after ``start`` it fake-quantizes.
``freeze`` stops the bounds from learning (they are detached in forward); ``thaw`` undoes it; ``stop``
returns to float.

Bounds (effective ``lo``/``hi``, ``eps = (hi - lo) / (n_levels - 1)``, floored at ``EPS_MIN``):
  * unsigned:               lo = 0, hi = ``clip_hi`` (PACT alpha)
  * signed, ``symm``:       almost-symmetric, zero exact: lo = -m, eps = m / floor(n/2), hi = lo + (n-1) eps
                            with m = ``clip_hi`` (n = 256: codes -128..127, hi = 127/128 m)
  * signed, not ``symm``:   lo = ``clip_lo``, hi = ``clip_hi``
  * ``tqt``:                parameter ``log2_t``; scale s (see :mod:`labkit.quant.functional`), lo = n s, hi = p s
                            (t = 2^log2_t is -lo when signed, hi when unsigned and not ``pow2``);
                            TQT grids are symmetric by design (``symm`` is ignored)
``start`` initialises by ``init_clip`` (rules in :mod:`labkit.quant.init`); symmetric grids take
m = max(|lo|, |hi|) of the rule's range, except ``const`` where m = ``init_clip_hi``. Every symmetric grid,
``sawb_symm`` included, is the almost-symmetric one above: zero must be a code of an integer network (the
reference puts ``sawb_symm`` on the exactly symmetric [-m, m], eps = 2m / (n - 1), where an even n has no zero).
Weight bounds that are not learned follow the weights (:meth:`labkit.quant.layers.PACTConv2d.refresh_bounds`).
With ``learn_clip`` the bound parameters receive the PACT gradients (or the TQT log2 t gradient) once started;
the raw TQT gradient is normalised by :func:`labkit.quant.optimizers.normalize_tqt_grads`, which the training loop
calls right before each optimizer step. ``requires_grad`` of bound parameters is ``learn_clip`` and never
changes (DDP registers parameters once); frozen or not-yet-started bounds are simply not used with autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from labkit.config.spec import QuantSpec
from labkit.quant.functional import (
    EPS_MIN,
    normalize_tqt_grad,
    pact_quantize,
    tqt_code_range,
    tqt_quantize,
    tqt_scale,
)


class QuantizerBase(nn.Module):
    """Common state, bounds and commands of every quantizer (see module docstring for the bound rules).

    Subclasses call :meth:`_setup_quantizer` in ``__init__`` and implement :meth:`_raw_init_bounds`. Every
    setting of the spec reads as an attribute (``q.n_levels``, ``q.tqt``, ``q.signed``, ...).
    """

    spec: QuantSpec

    # ------------------------------------------------------------------ construction
    def _setup_quantizer(self, spec: QuantSpec, clip_shape: tuple = ()) -> None:
        self.spec = spec
        self.clip_shape = tuple(clip_shape)
        lg = spec.learn_clip
        if spec.tqt:
            hi0 = math.log2(max(abs(spec.init_clip_hi), 1e-6))
            self.log2_t = nn.Parameter(torch.full(self.clip_shape, hi0), requires_grad=lg)
            self.register_buffer("tqt_var", torch.zeros(self.clip_shape))
            self.register_buffer("tqt_step", torch.zeros(()))
        else:
            hi0 = spec.init_clip_hi if not (spec.signed and spec.symm) else \
                max(abs(spec.init_clip_lo), abs(spec.init_clip_hi))
            self.clip_hi = nn.Parameter(torch.full(self.clip_shape, hi0), requires_grad=lg)
            if spec.signed and not spec.symm:
                self.clip_lo = nn.Parameter(torch.full(self.clip_shape, spec.init_clip_lo), requires_grad=lg)
        self.register_buffer("started_flag", torch.tensor(False))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self._started = self._frozen = False

    @torch.no_grad()
    def normalize_log2_t_grad(self) -> None:
        """Replace ``log2_t.grad`` (the paper's raw gradient) by its Adam-like normalisation (``tqt_beta``,
        optional tanh), updating the running variance; :func:`labkit.quant.optimizers.normalize_tqt_grads` does it
        for a whole network at once."""
        if self.tqt and self.log2_t.grad is not None:
            g = self.log2_t.grad
            g.copy_(normalize_tqt_grad(g, self.tqt_var, self.tqt_step, self.tqt_beta, self.tqt_clip_grad))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._started, self._frozen = bool(self.started_flag), bool(self.frozen_flag)

    # ------------------------------------------------------------------ state
    @property
    def started(self) -> bool:
        return self._started

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _set_flags(self, started: bool | None = None, frozen: bool | None = None) -> None:
        if started is not None:
            self._started = bool(started)
            self.started_flag.fill_(self._started)
        if frozen is not None:
            self._frozen = bool(frozen)
            self.frozen_flag.fill_(self._frozen)

    def clip_parameters(self) -> list[nn.Parameter]:
        """The bound parameters (``clip_lo``/``clip_hi`` or ``log2_t``)."""
        names = ("log2_t",) if self.tqt else ("clip_lo", "clip_hi")
        return [p for n, p in self._parameters.items() if n in names and p is not None]

    @property
    def bounds_trainable(self) -> bool:
        return self.learn_clip and self._started and not self._frozen

    @torch.no_grad()
    def start(self, init_clip_hi: float | None = None, init_clip_lo: float | None = None) -> None:
        """Initialise the bounds by ``init_clip`` and begin fake-quantizing. No-op when already started
        (so re-applying a schedule after a resume keeps learned bounds). ``init_clip_hi``/``_lo`` override
        the ``const`` values."""
        if self._started:
            return
        given = {k: v for k, v in (("init_clip_hi", init_clip_hi), ("init_clip_lo", init_clip_lo)) if v is not None}
        if given:
            self.spec = self.spec.replace(**given)
        lo, hi = self._raw_init_bounds()
        if self.init_clip == "const" and self.signed and (self.symm or self.tqt):
            lo = -hi  # symmetric grids: const gives m = init_clip_hi
        self._set_bounds(lo, hi)
        self._set_flags(started=True)

    def freeze(self) -> None:
        """Bounds stop learning (detached in forward; gradients cleared)."""
        self._set_flags(frozen=True)
        for p in self.clip_parameters():
            p.grad = None

    def thaw(self) -> None:
        self._set_flags(frozen=False)

    def stop(self) -> None:
        """Back to float; bounds are kept (a later ``start`` re-initialises them)."""
        self._set_flags(started=False)

    # ------------------------------------------------------------------ bounds
    def _raw_init_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _half(self) -> int:
        return self.n_levels // 2

    @torch.no_grad()
    def _set_bounds(self, lo: torch.Tensor, hi: torch.Tensor, reset_tqt_state: bool = True) -> None:
        """Store raw (lo, hi) (scalars or per-channel vectors) into the bound parameters (TQT: and restart the
        gradient normalisation's running variance unless ``reset_tqt_state`` is false)."""
        lo = lo.float().reshape(self.clip_shape) if lo.numel() > 1 else lo.float().reshape(())
        hi = hi.float().reshape(self.clip_shape) if hi.numel() > 1 else hi.float().reshape(())
        tiny = EPS_MIN * (self.n_levels - 1)
        if self.tqt:
            t = hi if not self.signed else torch.maximum(lo.abs(), hi.abs())
            self.log2_t.copy_(torch.log2(t.clamp(min=tiny)).expand(self.clip_shape))
            if reset_tqt_state:
                self.tqt_var.zero_()
                self.tqt_step.zero_()
        elif not self.signed:
            self.clip_hi.copy_(hi.clamp(min=tiny).expand(self.clip_shape))
        elif self.symm:
            self.clip_hi.copy_(torch.maximum(lo.abs(), hi.abs()).clamp(min=tiny).expand(self.clip_shape))
        else:
            self.clip_lo.copy_(lo.expand(self.clip_shape))
            self.clip_hi.copy_(torch.maximum(hi, lo + tiny).expand(self.clip_shape))

    def _bounds(self, trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective (lo, hi), shaped ``clip_shape`` (broadcast against the input); autograd iff trainable."""
        if self.tqt:
            n, p, _ = tqt_code_range(self.n_levels, self.signed)
            s = self._scale()
            return n * s, p * s
        hi = self.clip_hi if trainable else self.clip_hi.detach()
        if not self.signed:
            return torch.zeros_like(hi), hi
        if self.symm:
            d = self._half()
            return -hi, hi * ((self.n_levels - 1 - d) / d)
        lo = self.clip_lo if trainable else self.clip_lo.detach()
        return lo, hi

    def _scale(self) -> torch.Tensor:
        return tqt_scale(self.log2_t.detach(), self.n_levels, self.signed, self.pow2)

    def get_clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective (lo, hi) as detached tensors of shape ``()`` (per layer) or ``(C,)`` (per channel)."""
        lo, hi = self._bounds()
        hi = torch.maximum(hi, lo + EPS_MIN * (self.n_levels - 1))
        return self._flat(lo), self._flat(hi)

    def get_eps(self) -> torch.Tensor:
        """``eps = (hi - lo) / (n_levels - 1)`` of the effective bounds (TQT: the scale s), floored at EPS_MIN."""
        if self.tqt:
            return self._flat(self._scale())
        lo, hi = self._bounds()
        return self._flat(torch.clamp((hi - lo) / (self.n_levels - 1), min=EPS_MIN))

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.reshape(-1) if self.clip_shape else t.reshape(())

    @torch.no_grad()
    def set_eps(self, eps) -> None:
        """Set the bounds so that ``get_eps() == eps`` (unsigned: hi = (n-1) eps; symmetric: m = floor(n/2) eps;
        asymmetric: lo kept, hi = lo + (n-1) eps; TQT: log2 t = log2(eps D), pow2 picks ceil(log2 eps))."""
        eps = torch.as_tensor(eps, dtype=torch.float32, device=self.started_flag.device).clamp(min=EPS_MIN)
        if self.tqt:
            _, _, d = tqt_code_range(self.n_levels, self.signed, self.pow2)
            if self.pow2:  # land strictly inside (k - 1, k] so that ceil() gives k exactly
                k = torch.ceil(torch.log2(eps) - 1e-6)
                self.log2_t.copy_((k + math.log2(d) - 0.5).expand(self.clip_shape))
            else:
                self.log2_t.copy_(torch.log2(eps * d).expand(self.clip_shape))
        elif not self.signed:
            self.clip_hi.copy_((eps * (self.n_levels - 1)).expand(self.clip_shape))
        elif self.symm:
            self.clip_hi.copy_((eps * self._half()).expand(self.clip_shape))
        else:
            self.clip_hi.copy_(self.clip_lo + eps * (self.n_levels - 1))

    # ------------------------------------------------------------------ quantization
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x with the current bounds (regardless of ``started``)."""
        trainable = self.learn_clip and not self._frozen
        if self.tqt:  # the paper's raw gradient here; normalised before the optimizer step (normalize_tqt_grads)
            log2_t = self.log2_t if trainable else self.log2_t.detach()
            return tqt_quantize(x, log2_t, self.n_levels, self.signed, self.pow2, self.rounding)
        lo, hi = self._bounds(trainable)
        if self.noisy and self.training:  # dithering: uniform noise of one step, centred
            eps = torch.clamp((hi - lo).detach() / (self.n_levels - 1), min=EPS_MIN)
            x = x + (torch.rand_like(x) - 0.5) * eps.to(x.dtype)
        return pact_quantize(x, lo, hi, self.n_levels, self.rounding)

    def quant_summary(self) -> dict:
        """JSON-friendly floats: lo, hi, eps, n_levels (and log2_t with TQT); per channel: means plus
        hi_min / hi_max (and lo_min / lo_max)."""
        lo, hi = self.get_clip()
        eps = self.get_eps()
        out: dict = {"n_levels": int(self.n_levels)}
        vals = {"lo": lo, "hi": hi, "eps": eps}
        if self.tqt:
            vals["log2_t"] = self._flat(self.log2_t)
        for k, v in vals.items():
            out[k] = float(v.float().mean())
        if hi.numel() > 1:
            out.update(hi_min=float(hi.min()), hi_max=float(hi.max()), lo_min=float(lo.min()), lo_max=float(lo.max()))
        return out

    def _quant_repr(self) -> str:
        s = f"n_levels={self.n_levels}, init_clip={self.init_clip!r}, learn_clip={self.learn_clip}"
        if self.tqt:
            s += f", tqt=True, pow2={self.pow2}"
        return s


def _spec_property(name: str) -> property:
    return property(lambda self: getattr(self.spec, name), doc=f"``self.spec.{name}``")


for _name in ("n_levels", "init_clip", "learn_clip", "symm", "rounding", "nb_std", "init_clip_lo", "init_clip_hi",
              "tqt", "pow2", "tqt_beta", "tqt_clip_grad", "noisy", "signed", "bits"):
    setattr(QuantizerBase, _name, _spec_property(_name))


def quantizers(net: nn.Module) -> list[tuple[str, QuantizerBase]]:
    """``(name, module)`` of every quantizer in ``net`` (layers, activations, adder inputs/outputs)."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, QuantizerBase)]


def quant_summaries(net: nn.Module) -> dict[str, dict]:
    """``{module_name: quant_summary()}`` for every quantizer (adders' appear as ``name.acts.i``/``name.act_out``)."""
    return {n: m.quant_summary() for n, m in quantizers(net)}
