"""Activation quantizers (PACT/TQT, unsigned and signed) and the integer adder that harmonization inserts."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from labkit.config.spec import QuantSpec
from labkit.quant import init as qinit
from labkit.quant.base import QuantizerBase



class _ActQuantizer(QuantizerBase):
    """Activation quantizer: float ``act_kind`` before ``start``, gathering in training mode the statistics
    its ``init_clip`` rule reads (none for ``const``: a rule changed after gathering needs a new pass); fake
    quantization after.

    Built from a :class:`QuantSpec` (``spec=``) or from its settings as keyword arguments."""

    ROLE = "unsigned_act"

    def __init__(self, spec: QuantSpec | None = None, **settings):
        super().__init__()
        if spec is None:
            spec = QuantSpec.for_role(self.ROLE, **settings)
        elif settings:
            spec = spec.replace(**settings)
        if spec.role != self.ROLE:
            raise ValueError(f"{type(self).__name__} needs a '{self.ROLE}' spec, got role '{spec.role}'")
        self._setup_quantizer(spec)
        for name in qinit.STAT_NAMES:
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("n_stat_batches", torch.zeros((), dtype=torch.long))

    act_kind = property(lambda self: self.spec.act_kind)
    leaky = property(lambda self: self.spec.leaky)
    percentile = property(lambda self: self.spec.percentile)
    stat_momentum = property(lambda self: self.spec.stat_momentum)

    def float_act(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.spec.act_kind
        if kind == "relu":
            return F.relu(x)
        if kind == "relu6":
            return F.relu6(x)
        if kind == "leaky_relu":
            return F.leaky_relu(x, self.spec.leaky)
        return x

    def stats(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in qinit.STAT_NAMES + ("n_stat_batches",)}

    def _raw_init_bounds(self):
        mode = self.init_clip
        if mode != "const" and int(self.n_stat_batches) == 0:
            warnings.warn(f"{type(self).__name__}: start() with init_clip={mode!r} but no statistics were "
                          f"gathered (no training batch before start): using const [{self.init_clip_lo}, "
                          f"{self.init_clip_hi}]",
                          stacklevel=3)
            mode = "const"
        return qinit.act_clip(self.stats(), mode, self.nb_std, self.init_clip_lo, self.init_clip_hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._started:
            y = self.float_act(x)
            if self.training:
                spec = self.spec
                qinit.update_act_stats(self.stats(), y, spec.stat_momentum, spec.percentile, spec.init_clip)
            return y
        return self.fake_quant(x if not self.signed else self.float_act(x))

    def extra_repr(self) -> str:
        return (
            f"{self._quant_repr()}, act_kind={self.act_kind!r}, started={self._started},"
            f" frozen={self._frozen}"
        )


class PACTUnsignedAct(_ActQuantizer):
    """``y = q(clamp(x, 0, alpha))`` on ``n_levels`` levels, eps = alpha / (n_levels - 1); alpha =
    ``clip_hi``, learned with dL/dalpha = sum of g over x >= alpha when ``learn_clip``. Float ``act_kind``
    before start. Settings: :class:`QuantSpec` role ``unsigned_act``."""

    ROLE = "unsigned_act"


class PACTAsymmetricAct(_ActQuantizer):
    """Signed activation quantizer ``y = q(act(x))`` on [lo, hi]; ``symm``: almost-symmetric (lo = -m,
    eps = m / floor(n/2)), else lo and hi both learned (dL/dlo = sum of g over x < lo).
    Settings: :class:`QuantSpec` role ``signed_act``."""

    ROLE = "signed_act"


class PACTIntegerAdd(nn.Module):
    """``y = act_out(sum_i acts[i](x_i))``. :meth:`sync_eps` gives all input quantizers one eps (the largest
    input eps, or the output's with ``force_out_eps``) so their integer codes add exactly:
    ``sum_i x_i = sum_i lo_i + eps * sum_i c_i``. ``spec`` / ``settings``: the quantizers' settings
    (role ``signed_act``, or ``unsigned_act`` with ``signed=False``: then ``act_kind`` defaults to
    identity)."""

    def __init__(self, num_args: int = 2, spec: QuantSpec | None = None, force_out_eps: bool = False,
                 signed: bool = True, **settings):
        super().__init__()
        if isinstance(num_args, bool) or not isinstance(num_args, int) or num_args < 1:
            raise ValueError(f"num_args must be an integer >= 1, got {num_args!r}")
        cls = PACTAsymmetricAct if signed else PACTUnsignedAct
        if spec is None:
            if not signed:
                settings.setdefault("act_kind", "identity")
            spec = QuantSpec.for_role(cls.ROLE, **settings)
        elif settings:
            spec = spec.replace(**settings)
        self.acts = nn.ModuleList([cls(spec) for _ in range(num_args)])
        self.act_out = cls(spec)
        self.num_args, self.spec = num_args, spec
        self.force_out_eps, self.signed = bool(force_out_eps), bool(signed)

    @property
    def n_levels(self) -> int:
        return self.spec.n_levels

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
