"""The one quantizer-settings object: :class:`QuantSpec` holds every setting with its default, validated once.

A quantizer has a *role* that fixes its sign and which settings apply:

=================== ================================ =====================================================
role                module                           role-specific defaults
=================== ================================ =====================================================
``unsigned_act``    :class:`PACTUnsignedAct`         ``act_kind='relu6'``, ``init_clip_lo=0``, ``init_clip_hi=6``
``signed_act``      :class:`PACTAsymmetricAct`       ``act_kind='identity'``, ``init_clip_lo=-6``, ``init_clip_hi=6``
``weights``         :class:`PACTConv2d`/``Linear``   ``init_clip='sawb_asymm'``, ``learn_clip=False``,
                                                     ``init_clip_lo=-1``, ``init_clip_hi=1``
=================== ================================ =====================================================

The configs' spelling ``symm_wts`` (weights) is the field ``symm``. Activation settings (``act_kind``,
``leaky``, ``percentile``, ``stat_momentum``, ``noisy``) are rejected for weights, ``quantize`` for
activations. ``n_levels`` lies in ``[MIN_LEVELS, MAX_LEVELS]`` (2 to 16 bits: a 1-bit grid has no zero
on the symmetric side and trains into NaN; beyond 16 bits float32 fake quantization is no longer exact).
Torch-free, so that configs are checked before torch is imported (:mod:`labkit.config.schema`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

WEIGHT_INIT_MODES = ("max", "std", "sawb_symm", "sawb_asymm", "const")
ACT_INIT_MODES = ("max", "std", "percentile", "const")
ROLES = ("unsigned_act", "signed_act", "weights")
ACT_KINDS = ("relu", "relu6", "leaky_relu", "identity")
QUANTIZE_MODES = ("per_layer", "per_channel")
MIN_LEVELS, MAX_LEVELS = 3, 2 ** 16

_ACT_ONLY = ("act_kind", "leaky", "percentile", "stat_momentum", "noisy")
_WEIGHT_ONLY = ("quantize",)
_ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "unsigned_act": {"act_kind": "relu6", "init_clip_lo": 0.0, "init_clip_hi": 6.0, "symm": False},
    "signed_act": {"act_kind": "identity", "init_clip_lo": -6.0, "init_clip_hi": 6.0},
    "weights": {"init_clip": "sawb_asymm", "learn_clip": False, "init_clip_lo": -1.0, "init_clip_hi": 1.0},
}
_ALIASES = {"symm_wts": "symm"}


class SpecError(ValueError):
    """An invalid quantizer setting; the message names the setting, the value and what is allowed."""


@dataclass(frozen=True)
class QuantSpec:
    """Settings of one quantizer (see the module docstring for roles).

    Grid: ``eps = (hi - lo) / (n_levels - 1)``; ``symm`` (signed only): almost-symmetric, zero exact;
    ``tqt``: trained ``log2 t``, ``pow2``: power-of-two scales. ``init_clip``: the bound rule at ``start``
    (:mod:`labkit.quant.init`); ``learn_clip``: bounds receive PACT (or TQT) gradients once started.
    """

    role: str = "unsigned_act"
    n_levels: int = 256
    init_clip: str = "max"
    learn_clip: bool = True
    symm: bool = True
    rounding: bool = True
    nb_std: float = 3.0
    init_clip_lo: float = -6.0
    init_clip_hi: float = 6.0
    tqt: bool = False
    pow2: bool = False
    tqt_beta: float = 0.9
    tqt_clip_grad: bool = True
    # activations
    act_kind: str = "relu6"
    leaky: float = 0.1
    percentile: float = 99.99
    stat_momentum: float = 0.1
    noisy: bool = False
    # weights
    quantize: str = "per_layer"
    _explicit: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        _choice("role", self.role, ROLES)
        n = self.n_levels
        if isinstance(n, bool) or not isinstance(n, int):
            raise SpecError(f"n_levels must be an integer (2**bits, e.g. 256 for 8 bits), got {n!r}")
        if not MIN_LEVELS <= n <= MAX_LEVELS:
            raise SpecError(f"n_levels={n} ({math.log2(n) if n > 0 else float('nan'):.3g} bits) is outside "
                            f"{MIN_LEVELS}..{MAX_LEVELS}: use 2 to 16 bits (n_levels = 2**bits)")
        _choice("init_clip", self.init_clip, WEIGHT_INIT_MODES if self.role == "weights" else ACT_INIT_MODES)
        for name in ("learn_clip", "symm", "rounding", "tqt", "pow2", "tqt_clip_grad", "noisy"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("nb_std", "init_clip_lo", "init_clip_hi", "tqt_beta", "leaky", "percentile", "stat_momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SpecError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.pow2 and not self.tqt:
            raise SpecError("pow2=True needs tqt=True (power-of-two scales are TQT's)")
        if not 0.0 <= self.tqt_beta < 1.0:
            raise SpecError(f"tqt_beta must lie in [0, 1), got {self.tqt_beta!r}")
        if self.nb_std <= 0:
            raise SpecError(f"nb_std must be > 0, got {self.nb_std!r}")
        _choice("act_kind", self.act_kind, ACT_KINDS)
        if not 50.0 < self.percentile <= 100.0:
            raise SpecError(f"percentile must lie in (50, 100], got {self.percentile!r}")
        if not 0.0 < self.stat_momentum <= 1.0:
            raise SpecError(f"stat_momentum must lie in (0, 1], got {self.stat_momentum!r}")
        _choice("quantize", self.quantize, QUANTIZE_MODES)

    @classmethod
    def for_role(cls, role: str, **settings: Any) -> QuantSpec:
        """The spec of ``role`` with its defaults, overridden by ``settings`` (``symm_wts`` -> ``symm``).

        Unknown settings, and settings of another role, raise ``TypeError`` naming them and the allowed ones.
        """
        _choice("role", role, ROLES)
        given = {_ALIASES.get(k, k): v for k, v in settings.items()}
        allowed = settings_of(role)
        unknown = sorted(k for k in settings if _ALIASES.get(k, k) not in allowed)
        if unknown:
            raise TypeError(f"unknown quantizer setting(s) {', '.join(map(repr, unknown))} for {role}; allowed: "
                            f"{', '.join(sorted(allowed))}")
        return cls(role=role, _explicit=frozenset(given), **{**_ROLE_DEFAULTS[role], **given})

    def replace(self, **settings: Any) -> QuantSpec:
        """A copy with ``settings`` changed (validated; same rules as :meth:`for_role`)."""
        explicit = {k: getattr(self, k) for k in self._explicit}
        return QuantSpec.for_role(self.role, **{**explicit, **settings})

    @property
    def signed(self) -> bool:
        return self.role != "unsigned_act"

    @property
    def bits(self) -> int:
        """``ceil(log2 n_levels)``."""
        return math.ceil(math.log2(self.n_levels))

    @property
    def per_channel(self) -> bool:
        return self.quantize == "per_channel"

    def settings(self, explicit_only: bool = False) -> dict[str, Any]:
        """``{setting: value}`` of this role (only those given explicitly when ``explicit_only``)."""
        names = self._explicit if explicit_only else settings_of(self.role)
        return {k: getattr(self, k) for k in sorted(names)}


def settings_of(role: str) -> frozenset[str]:
    """The setting names a quantizer of ``role`` takes (``symm_wts`` is accepted as ``symm``)."""
    names = {f.name for f in dataclasses.fields(QuantSpec)} - {"role", "_explicit"}
    if role == "weights":
        return frozenset(names - set(_ACT_ONLY))
    names -= set(_WEIGHT_ONLY)
    return frozenset(names - {"symm"}) if role == "unsigned_act" else frozenset(names)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SpecError(f"{name}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")
