"""Fake-quantized layers: PACT/SAWB and TQT quantizers, quantized conv/linear, integer adder.

Every quantizer derives from :class:`QuantizerBase` and has two states kept in persistent buffers
(``started_flag``, ``frozen_flag``): before ``start`` it runs in float (activations also gather statistics in
training mode); after ``start`` it fake-quantizes. ``freeze`` stops the bounds from learning (they are
detached in forward); ``thaw`` undoes it; ``stop`` returns to float.

Bounds (effective ``lo``/``hi``, ``eps = (hi - lo) / (n_levels - 1)``, floored at ``EPS_MIN``):
  * unsigned:               lo = 0, hi = ``clip_hi`` (PACT alpha)
  * signed, ``symm``:       almost-symmetric, zero exact: lo = -m, eps = m / floor(n/2), hi = lo + (n-1) eps
                            with m = ``clip_hi`` (n = 256: codes -128..127, hi = 127/128 m)
  * signed, not ``symm``:   lo = ``clip_lo``, hi = ``clip_hi``
  * ``tqt``:                parameter ``log2_t``; scale s (see :mod:`labkit.quant.functional`), lo = n s, hi = p s;
                            TQT grids are symmetric by design (``symm`` is ignored)
``start`` initialises by ``init_clip`` (rules in :mod:`labkit.quant.init`); symmetric grids take
m = max(|lo|, |hi|) of the rule's range, except ``const`` where m = ``init_clip_hi``.
With ``learn_clip`` the bound parameters receive the PACT gradients (or the TQT log2 t gradient) once started;
the TQT gradient is normalised right before each torch optimizer step (global step pre-hook, AMP-safe).
``requires_grad`` of bound parameters is ``learn_clip`` and never changes (DDP registers parameters once);
frozen or not-yet-started bounds are simply not used with autograd.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from labkit.quant import init as qinit
from labkit.quant.functional import (
    EPS_MIN,
    normalize_tqt_grad,
    pact_quantize,
    tqt_code_range,
    tqt_quantize,
    tqt_scale,
)

ACT_KINDS = ("relu", "relu6", "leaky_relu", "identity")
QUANTIZE_MODES = ("per_layer", "per_channel")
_STAT_NAMES = ("running_min", "running_max", "running_mean", "running_var", "running_pct_lo", "running_pct_hi")


# ---------------------------------------------------------------------------------------- TQT normalisation
# TQT's log2 t gradient is normalised (Adam-like) just before the optimizer step, not in backward: there the
# gradients are final (accumulated, DDP-averaged, unscaled by an AMP GradScaler, which also skips the step on
# inf/NaN). A global optimizer step pre-hook normalises the log2_t of every live TQT quantizer that the
# stepping optimizer holds; the running variance lives in the quantizer's buffers (checkpointed with the net).
_TQT_MODULES: "weakref.WeakSet[QuantizerBase]" = weakref.WeakSet()


def _tqt_step_pre_hook(optimizer, args, kwargs):
    ids = None
    todo: dict[tuple, list] = {}
    for m in list(_TQT_MODULES):
        p = m._parameters.get("log2_t")
        if p is None or p.grad is None:
            continue
        if ids is None:
            ids = {id(q) for g in optimizer.param_groups for q in g["params"]}
        if id(p) in ids:
            key = (m.tqt_beta, m.tqt_clip_grad, p.grad.device, p.grad.dtype, m.tqt_var.dtype, m.tqt_step.dtype)
            todo.setdefault(key, []).append(m)
    for (beta, clip_grad, *_), mods in todo.items():
        if len(mods) == 1:
            mods[0].normalize_log2_t_grad()
        else:
            _normalize_many(mods, beta, clip_grad)
    return None


@torch.no_grad()
def _normalize_many(mods: list, beta: float, clip_grad: bool) -> None:
    """:func:`normalize_tqt_grad` for many quantizers at once (same beta, clip, device, dtypes), on their
    concatenated gradients and states: a few dozen ops per optimizer step instead of a dozen per quantizer.
    Each quantizer keeps its own finiteness check (a non-finite gradient passes through and leaves that
    quantizer's state alone); no host synchronisation."""
    grads = [m.log2_t.grad for m in mods]
    var_list = [m.tqt_var for m in mods]
    step_list = [m.tqt_step for m in mods]
    sizes = [g.numel() for g in grads]
    dev = grads[0].device
    seg = torch.repeat_interleave(torch.arange(len(mods), device=dev), torch.tensor(sizes, device=dev))
    var = torch.cat([v.reshape(-1) for v in var_list])
    gd = torch.cat([g.reshape(-1) for g in grads]).to(var.dtype)
    ok = torch.ones(len(mods), dtype=var.dtype, device=dev).scatter_reduce_(
        0, seg, torch.isfinite(gd).to(var.dtype), reduce="amin").bool()
    steps = torch.stack([t.reshape(()) for t in step_list])
    out = normalize_tqt_grad(gd, var, steps[seg], beta, clip_grad, ok=ok[seg])
    torch._foreach_copy_(var_list, [t.view_as(v) for t, v in zip(var.split(sizes), var_list)])
    torch._foreach_copy_(step_list, [t.view_as(v) for t, v in zip((steps + ok).unbind(), step_list)])
    torch._foreach_copy_(grads, [t.view_as(g).to(g.dtype) for t, g in zip(out.split(sizes), grads)])


register_optimizer_step_pre_hook(_tqt_step_pre_hook)


def _check_n_levels(n_levels) -> int:
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    return n_levels


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


class QuantizerBase(nn.Module):
    """Common state, bounds and commands of every quantizer (see module docstring for the bound rules).

    Subclasses call :meth:`_setup_quantizer` in ``__init__`` and implement :meth:`_raw_init_bounds`.
    """

    INIT_MODES: tuple[str, ...] = qinit.ACT_INIT_MODES

    # ------------------------------------------------------------------ construction
    def _setup_quantizer(self, *, n_levels, init_clip, learn_clip, signed, symm, tqt, tqt_beta, tqt_clip_grad,
                         pow2, rounding, nb_std, noisy, clip_shape, init_clip_lo, init_clip_hi) -> None:
        self.n_levels = _check_n_levels(n_levels)
        qinit.check_mode(init_clip, self.INIT_MODES, type(self).__name__)
        if pow2 and not tqt:
            raise ValueError("pow2=True needs tqt=True (power-of-two scales are TQT's)")
        if not 0.0 <= float(tqt_beta) < 1.0:
            raise ValueError(f"tqt_beta must lie in [0, 1), got {tqt_beta!r}")
        self.init_clip, self.learn_clip, self.signed, self.symm = init_clip, bool(learn_clip), bool(signed), bool(symm)
        self.tqt, self.tqt_beta, self.tqt_clip_grad, self.pow2 = bool(tqt), float(tqt_beta), bool(tqt_clip_grad), bool(pow2)
        self.rounding, self.nb_std, self.noisy = bool(rounding), float(nb_std), bool(noisy)
        self.init_clip_lo, self.init_clip_hi = float(init_clip_lo), float(init_clip_hi)
        self.clip_shape = tuple(clip_shape)
        lg = self.learn_clip
        if self.tqt:
            self.log2_t = nn.Parameter(torch.full(self.clip_shape, math.log2(max(abs(self.init_clip_hi), 1e-6))),
                                       requires_grad=lg)
            self.register_buffer("tqt_var", torch.zeros(self.clip_shape))
            self.register_buffer("tqt_step", torch.zeros(()))
            _TQT_MODULES.add(self)
        else:
            hi0 = self.init_clip_hi if not (self.signed and self.symm) else max(abs(self.init_clip_lo), abs(self.init_clip_hi))
            self.clip_hi = nn.Parameter(torch.full(self.clip_shape, hi0), requires_grad=lg)
            if self.signed and not self.symm:
                self.clip_lo = nn.Parameter(torch.full(self.clip_shape, self.init_clip_lo), requires_grad=lg)
        self.register_buffer("started_flag", torch.tensor(False))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self._started = self._frozen = False
        self.verbose = False

    def __setstate__(self, state):  # deepcopy / unpickling: register TQT quantizers for normalisation
        super().__setstate__(state)
        if getattr(self, "tqt", False):
            _TQT_MODULES.add(self)

    @torch.no_grad()
    def normalize_log2_t_grad(self) -> None:
        """Replace ``log2_t.grad`` (the paper's raw gradient) by its Adam-like normalisation (``tqt_beta``,
        optional tanh); runs automatically before every torch optimizer step that holds ``log2_t``."""
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
        if init_clip_hi is not None:
            self.init_clip_hi = float(init_clip_hi)
        if init_clip_lo is not None:
            self.init_clip_lo = float(init_clip_lo)
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
    def _set_bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Store raw (lo, hi) (scalars or per-channel vectors) into the bound parameters."""
        lo = lo.float().reshape(self.clip_shape) if lo.numel() > 1 else lo.float().reshape(())
        hi = hi.float().reshape(self.clip_shape) if hi.numel() > 1 else hi.float().reshape(())
        tiny = EPS_MIN * (self.n_levels - 1)
        if self.tqt:
            t = hi if not self.signed else torch.maximum(lo.abs(), hi.abs())
            self.log2_t.copy_(torch.log2(t.clamp(min=tiny)).expand(self.clip_shape))
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
            _, _, d = tqt_code_range(self.n_levels, self.signed)
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
        if self.tqt:  # raw paper gradient here; normalised before the optimizer step (see top of module)
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


# ---------------------------------------------------------------------------------------- activations
class _ActQuantizer(QuantizerBase):
    """Activation quantizer: float ``act_kind`` and statistics before ``start``; fake quantization after."""

    def _setup_act(self, *, act_kind, leaky, percentile, stat_momentum, **kw) -> None:
        _check_choice("act_kind", act_kind, ACT_KINDS)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile!r}")
        if not 0.0 < float(stat_momentum) <= 1.0:
            raise ValueError(f"stat_momentum must lie in (0, 1], got {stat_momentum!r}")
        self._setup_quantizer(clip_shape=(), **kw)
        self.act_kind, self.leaky = act_kind, float(leaky)
        self.percentile, self.stat_momentum = float(percentile), float(stat_momentum)
        for name in _STAT_NAMES:
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("n_stat_batches", torch.zeros((), dtype=torch.long))

    def float_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_kind == "relu":
            return F.relu(x)
        if self.act_kind == "relu6":
            return F.relu6(x)
        if self.act_kind == "leaky_relu":
            return F.leaky_relu(x, self.leaky)
        return x

    def stats(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in _STAT_NAMES + ("n_stat_batches",)}

    def _raw_init_bounds(self):
        mode = self.init_clip
        if mode != "const" and int(self.n_stat_batches) == 0:
            warnings.warn(f"{type(self).__name__}: start() with init_clip={mode!r} but no statistics were gathered "
                          f"(no training batch before start): using const [{self.init_clip_lo}, {self.init_clip_hi}]")
            mode = "const"
        return qinit.act_clip(self.stats(), mode, self.nb_std, self.init_clip_lo, self.init_clip_hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._started:
            y = self.float_act(x)
            if self.training:
                qinit.update_act_stats(self.stats(), y, self.stat_momentum, self.percentile)
            return y
        return self.fake_quant(x if not self.signed else self.float_act(x))

    def extra_repr(self) -> str:
        return f"{self._quant_repr()}, act_kind={self.act_kind!r}, started={self._started}, frozen={self._frozen}"


class PACTUnsignedAct(_ActQuantizer):
    """``y = q(clamp(x, 0, alpha))`` on ``n_levels`` levels, eps = alpha / (n_levels - 1); alpha = ``clip_hi``,
    learned with dL/dalpha = sum of g over x >= alpha when ``learn_clip``. Float ``act_kind`` before start."""

    def __init__(self, n_levels: int = 256, init_clip: str = "max", learn_clip: bool = True, act_kind: str = "relu6",
                 leaky: float = 0.1, nb_std: float = 3, noisy: bool = False, rounding: bool = True, tqt: bool = False,
                 tqt_beta: float = 0.9, tqt_clip_grad: bool = True, pow2: bool = False, percentile: float = 99.99,
                 stat_momentum: float = 0.1, init_clip_lo: float = 0.0, init_clip_hi: float = 6.0):
        super().__init__()
        self._setup_act(act_kind=act_kind, leaky=leaky, percentile=percentile, stat_momentum=stat_momentum,
                        n_levels=n_levels, init_clip=init_clip, learn_clip=learn_clip, signed=False, symm=False,
                        tqt=tqt, tqt_beta=tqt_beta, tqt_clip_grad=tqt_clip_grad, pow2=pow2, rounding=rounding,
                        nb_std=nb_std, noisy=noisy, init_clip_lo=init_clip_lo, init_clip_hi=init_clip_hi)


class PACTAsymmetricAct(_ActQuantizer):
    """Signed activation quantizer ``y = q(act(x))`` on [lo, hi]; ``symm``: almost-symmetric (lo = -m,
    eps = m / floor(n/2)), else lo and hi both learned (dL/dlo = sum of g over x < lo)."""

    def __init__(self, n_levels: int = 256, init_clip: str = "max", learn_clip: bool = True,
                 act_kind: str = "identity", leaky: float = 0.1, symm: bool = True, nb_std: float = 3,
                 noisy: bool = False, rounding: bool = True, tqt: bool = False, tqt_beta: float = 0.9,
                 tqt_clip_grad: bool = True, pow2: bool = False, percentile: float = 99.99,
                 stat_momentum: float = 0.1, init_clip_lo: float = -6.0, init_clip_hi: float = 6.0):
        super().__init__()
        self._setup_act(act_kind=act_kind, leaky=leaky, percentile=percentile, stat_momentum=stat_momentum,
                        n_levels=n_levels, init_clip=init_clip, learn_clip=learn_clip, signed=True, symm=symm,
                        tqt=tqt, tqt_beta=tqt_beta, tqt_clip_grad=tqt_clip_grad, pow2=pow2, rounding=rounding,
                        nb_std=nb_std, noisy=noisy, init_clip_lo=init_clip_lo, init_clip_hi=init_clip_hi)


# ---------------------------------------------------------------------------------------- weights
class _WeightQuantizer(QuantizerBase):
    """Weight fake quantization for conv/linear subclasses (``self.weight``); float weights before start.

    Always signed. ``symm_wts``: almost-symmetric range (m = ``clip_hi``); else lo/hi free. ``per_channel``:
    one bound per output channel (dim 0), bound gradients reduced per channel."""

    INIT_MODES = qinit.WEIGHT_INIT_MODES

    def _setup_weight_quant(self, *, n_levels, quantize, init_clip, learn_clip, symm_wts, nb_std, tqt, tqt_beta,
                            tqt_clip_grad, pow2, rounding, init_clip_lo, init_clip_hi) -> None:
        _check_choice("quantize", quantize, QUANTIZE_MODES)
        self.quantize = quantize
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1) if quantize == "per_channel" else ()
        self._setup_quantizer(n_levels=n_levels, init_clip=init_clip, learn_clip=learn_clip, signed=True,
                              symm=symm_wts, tqt=tqt, tqt_beta=tqt_beta, tqt_clip_grad=tqt_clip_grad, pow2=pow2,
                              rounding=rounding, nb_std=nb_std, noisy=False, clip_shape=shape,
                              init_clip_lo=init_clip_lo, init_clip_hi=init_clip_hi)
        self.to(self.weight.device)

    @property
    def symm_wts(self) -> bool:
        return self.symm

    @property
    def per_channel(self) -> bool:
        return self.quantize == "per_channel"

    def _raw_init_bounds(self):
        return qinit.weight_clip(self.weight, self.init_clip, self.n_levels, self.per_channel, self.nb_std,
                                 self.init_clip_lo, self.init_clip_hi)

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward: fake-quantized after ``start``, float before."""
        return self.fake_quant(self.weight) if self._started else self.weight

    @torch.no_grad()
    def _copy_from(self, module: nn.Module):
        """Take ``module``'s weight, bias and train/eval mode (for ``from_float``); returns self."""
        self.weight.copy_(module.weight)
        if module.bias is not None:
            self.bias.copy_(module.bias)
        return self.train(module.training)

    def get_eps_w(self) -> torch.Tensor:
        """Weight quantizer's eps, shape ``()`` or ``(C_out,)``."""
        return self.get_eps()

    def get_clip_w(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight quantizer's effective (lo, hi), shape ``()`` or ``(C_out,)``."""
        return self.get_clip()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self._quant_repr()}, quantize={self.quantize!r}, "
                f"symm_wts={self.symm}, started={self._started}, frozen={self._frozen}")


_WEIGHT_DEFAULTS = dict(n_levels=256, quantize="per_layer", init_clip="sawb_asymm", learn_clip=False, symm_wts=True,
                        nb_std=3, tqt=False, tqt_beta=0.9, tqt_clip_grad=True, pow2=False, rounding=True,
                        init_clip_lo=-1.0, init_clip_hi=1.0)


class PACTConv2d(nn.Conv2d, _WeightQuantizer):
    """``nn.Conv2d`` whose weights are fake-quantized after ``start`` (see :class:`_WeightQuantizer`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *, n_levels: int = 256,
                 quantize: str = "per_layer", init_clip: str = "sawb_asymm", learn_clip: bool = False,
                 symm_wts: bool = True, nb_std: float = 3, tqt: bool = False, tqt_beta: float = 0.9,
                 tqt_clip_grad: bool = True, pow2: bool = False, rounding: bool = True, init_clip_lo: float = -1.0,
                 init_clip_hi: float = 1.0, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_weight_quant(n_levels=n_levels, quantize=quantize, init_clip=init_clip, learn_clip=learn_clip,
                                 symm_wts=symm_wts, nb_std=nb_std, tqt=tqt, tqt_beta=tqt_beta,
                                 tqt_clip_grad=tqt_clip_grad, pow2=pow2, rounding=rounding,
                                 init_clip_lo=init_clip_lo, init_clip_hi=init_clip_hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Conv2d, **quant_kwargs) -> "PACTConv2d":
        """A PACTConv2d with ``module``'s geometry, weights and bias (copied)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"PACTConv2d.from_float needs an nn.Conv2d, got {type(module).__name__}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode,
                  device=module.weight.device, dtype=module.weight.dtype, **quant_kwargs)
        return new._copy_from(module)


class PACTLinear(nn.Linear, _WeightQuantizer):
    """``nn.Linear`` whose weights are fake-quantized after ``start`` (see :class:`_WeightQuantizer`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, n_levels: int = 256,
                 quantize: str = "per_layer", init_clip: str = "sawb_asymm", learn_clip: bool = False,
                 symm_wts: bool = True, nb_std: float = 3, tqt: bool = False, tqt_beta: float = 0.9,
                 tqt_clip_grad: bool = True, pow2: bool = False, rounding: bool = True, init_clip_lo: float = -1.0,
                 init_clip_hi: float = 1.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_weight_quant(n_levels=n_levels, quantize=quantize, init_clip=init_clip, learn_clip=learn_clip,
                                 symm_wts=symm_wts, nb_std=nb_std, tqt=tqt, tqt_beta=tqt_beta,
                                 tqt_clip_grad=tqt_clip_grad, pow2=pow2, rounding=rounding,
                                 init_clip_lo=init_clip_lo, init_clip_hi=init_clip_hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Linear, **quant_kwargs) -> "PACTLinear":
        """A PACTLinear with ``module``'s shape, weights and bias (copied)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"PACTLinear.from_float needs an nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype, **quant_kwargs)
        return new._copy_from(module)


# ---------------------------------------------------------------------------------------- adder
class PACTIntegerAdd(nn.Module):
    """``y = act_out(sum_i acts[i](x_i))``. :meth:`sync_eps` gives all input quantizers one eps (the largest
    input eps, or the output's with ``force_out_eps``) so their integer codes add exactly:
    ``sum_i x_i = sum_i lo_i + eps * sum_i c_i``."""

    def __init__(self, num_args: int = 2, n_levels: int = 256, force_out_eps: bool = False, signed: bool = True,
                 **act_kwargs):
        super().__init__()
        if isinstance(num_args, bool) or not isinstance(num_args, int) or num_args < 1:
            raise ValueError(f"num_args must be an integer >= 1, got {num_args!r}")
        cls = PACTAsymmetricAct if signed else PACTUnsignedAct
        if not signed:
            act_kwargs.setdefault("act_kind", "identity")
        try:
            self.acts = nn.ModuleList([cls(n_levels=n_levels, **act_kwargs) for _ in range(num_args)])
            self.act_out = cls(n_levels=n_levels, **act_kwargs)
        except TypeError as e:
            raise TypeError(f"PACTIntegerAdd: {e}") from None
        self.num_args, self.n_levels = num_args, _check_n_levels(n_levels)
        self.force_out_eps, self.signed = bool(force_out_eps), bool(signed)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != self.num_args:
            raise TypeError(f"PACTIntegerAdd expects {self.num_args} inputs, got {len(xs)}")
        total = self.acts[0](xs[0])
        for act, x in zip(self.acts[1:], xs[1:]):
            total = total + act(x)
        return self.act_out(total)

    def quantizers(self) -> list[QuantizerBase]:
        return list(self.acts) + [self.act_out]

    @torch.no_grad()
    def sync_eps(self) -> None:
        """All started input quantizers get one eps: max of their eps, or ``act_out``'s with force_out_eps."""
        if not all(a.started for a in self.acts):
            return
        if self.force_out_eps and self.act_out.started:
            eps = self.act_out.get_eps()
        else:
            eps = torch.stack([a.get_eps().max() for a in self.acts]).max()
        for a in self.acts:
            a.set_eps(eps)

    def extra_repr(self) -> str:
        return f"num_args={self.num_args}, n_levels={self.n_levels}, force_out_eps={self.force_out_eps}"


def quantizers(net: nn.Module) -> list[tuple[str, QuantizerBase]]:
    """``(name, module)`` of every quantizer in ``net`` (layers, activations, adder inputs/outputs)."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, QuantizerBase)]


def quant_summaries(net: nn.Module) -> dict[str, dict]:
    """``{module_name: quant_summary()}`` for every quantizer (adders' appear as ``name.acts.i``/``name.act_out``)."""
    return {n: m.quant_summary() for n, m in quantizers(net)}
