"""Quantizer settings: one pydantic model per role, every setting with its default stated once, torch-free.

=================== ================================ =====================================================
role                module                           role-specific defaults
=================== ================================ =====================================================
``unsigned_act``    :class:`PACTUnsignedAct`         ``act_kind='relu6'``, ``init_clip_lo=0``,
``init_clip_hi=6`` ``signed_act``      :class:`PACTAsymmetricAct`       ``act_kind='identity'``,
``init_clip_lo=-6``, ``init_clip_hi=6`` ``weights``         :class:`PACTConv2d`/``Linear``
                                                     ``init_clip='sawb_asymm'``, ``learn_clip=False``,
                                                     ``init_clip_lo=-1``, ``init_clip_hi=1``
=================== ================================ =====================================================

Grid: ``eps = (hi - lo) / (n_levels - 1)``; ``symm`` (signed only; the configs spell it ``symm_wts`` for
weights): almost-symmetric, zero exact; ``tqt``: trained ``log2 t``, ``pow2``: power-of-two scales.
``n_levels`` lies in ``[MIN_LEVELS, MAX_LEVELS]``: 2 to 16 bits (a 1-bit grid has no zero on the symmetric
side and trains into NaN; beyond 16 bits float32 fake quantization is no longer exact).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROLES = ("unsigned_act", "signed_act", "weights")
WEIGHT_INIT_MODES = ("max", "std", "sawb_symm", "sawb_asymm", "const")
ACT_INIT_MODES = ("max", "std", "percentile", "const")
ACT_KINDS = ("relu", "relu6", "leaky_relu", "identity")
QUANTIZE_MODES = ("per_layer", "per_channel")
MIN_LEVELS, MAX_LEVELS = 3, 2 ** 16
MIN_BITS, MAX_BITS = 2, 16
#: exactness limit of integer requantization y = floor((x * mul + add) / 2^d) (float64 mantissa: the ONNX
#: export computes in double), and the largest shift d
EXACT_BITS, D_MAX = 53, 48


class SpecError(ValueError):
    """An invalid quantizer setting; the message names the setting, the value and what is allowed."""


class QuantSpec(BaseModel):
    """Settings of one quantizer; build one with :meth:`for_role` (the role's class checks its settings).

    ``init_clip``: the bound rule at ``start`` (:mod:`labkit.quant.init`); ``learn_clip``: bounds receive PACT
    (or TQT) gradients once started; ``nb_std``: the ``std`` rule's multiple of sigma.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              populate_by_name=True)
    ROLE: ClassVar[str] = ""
    #: what the setting names are called in error messages
    KIND: ClassVar[str] = "quantizer setting"

    n_levels: int = 256
    init_clip: str = "max"
    learn_clip: bool = True
    rounding: bool = True
    nb_std: float = Field(3.0, gt=0)
    init_clip_lo: float = -6.0
    init_clip_hi: float = 6.0
    tqt: bool = False
    pow2: bool = False
    tqt_beta: float = Field(0.9, ge=0, lt=1)
    tqt_clip_grad: bool = True

    @field_validator("n_levels", mode="before")
    @classmethod
    def _levels(cls, n: Any) -> Any:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"n_levels must be an integer (2**bits, e.g. 256 for 8 bits), got {n!r}")
        if not MIN_LEVELS <= n <= MAX_LEVELS:
            bits = f" ({math.log2(n):.3g} bits)" if n > 0 else ""
            raise ValueError(f"n_levels={n}{bits} is outside "
                             f"{MIN_LEVELS}..{MAX_LEVELS}: use {MIN_BITS} to {MAX_BITS} bits (n_levels = "
                             "2**bits)")
        return n

    @model_validator(mode="after")
    def _pow2_needs_tqt(self) -> QuantSpec:
        if self.pow2 and not self.tqt:
            raise ValueError("pow2=True needs tqt=True (power-of-two scales are TQT's)")
        return self

    @classmethod
    def for_role(cls, role: str, **settings: Any) -> QuantSpec:
        """The spec of ``role`` with its defaults, overridden by ``settings``; an unknown setting (or one of
        another role) raises ``TypeError``, a bad value :class:`SpecError`, each naming the setting."""
        if role not in SPECS:
            raise SpecError(f"role={role!r} is not valid; allowed: {', '.join(ROLES)}")
        spec_cls = SPECS[role]
        unknown = sorted(k for k in settings if k not in spec_cls.setting_names())
        if unknown:
            raise TypeError(f"unknown quantizer setting(s) {', '.join(map(repr, unknown))} for {role}; "
                            f"allowed: {', '.join(sorted(spec_cls.setting_names()))}")
        try:
            return spec_cls(**settings)
        except ValidationError as err:
            raise SpecError(describe_error(err.errors()[0])) from None

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        """Names a config may give (aliases included: ``symm_wts``)."""
        return frozenset(n for name, f in cls.model_fields.items() for n in (name, f.alias) if n)

    def replace(self, **settings: Any) -> QuantSpec:
        """A copy with ``settings`` changed, validated like :meth:`for_role`."""
        return QuantSpec.for_role(self.role, **{**self.settings(explicit_only=True), **settings})

    @property
    def role(self) -> str:
        return self.ROLE

    @property
    def signed(self) -> bool:
        return self.ROLE != "unsigned_act"

    @property
    def bits(self) -> int:
        """``ceil(log2 n_levels)``."""
        return math.ceil(math.log2(self.n_levels))

    @property
    def per_channel(self) -> bool:
        return False

    def settings(self, explicit_only: bool = False) -> dict[str, Any]:
        """``{setting: value}`` of this role (only those given explicitly when ``explicit_only``)."""
        names = self.model_fields_set if explicit_only else type(self).model_fields
        return {k: getattr(self, k) for k in sorted(names)}


class _ActSpec(QuantSpec):
    init_clip: Literal[ACT_INIT_MODES] = "max"
    act_kind: Literal[ACT_KINDS] = "relu6"
    leaky: float = 0.1
    percentile: float = Field(99.99, gt=50, le=100)
    stat_momentum: float = Field(0.1, gt=0, le=1)
    noisy: bool = False


class UnsignedActSpec(_ActSpec):
    """An unsigned activation (PACT alpha, or TQT t): lo = 0."""

    ROLE: ClassVar[str] = "unsigned_act"
    init_clip_lo: float = 0.0
    symm: ClassVar[bool] = False


class SignedActSpec(_ActSpec):
    """A signed activation (the harmonizer's inserted quantizers, adders)."""

    ROLE: ClassVar[str] = "signed_act"
    act_kind: Literal[ACT_KINDS] = "identity"
    symm: bool = True


class WeightSpec(QuantSpec):
    """Weights of a conv or linear layer; ``quantize``: one bound per layer or per output channel."""

    ROLE: ClassVar[str] = "weights"
    init_clip: Literal[WEIGHT_INIT_MODES] = "sawb_asymm"
    learn_clip: bool = False
    init_clip_lo: float = -1.0
    init_clip_hi: float = 1.0
    symm: bool = Field(True, alias="symm_wts")
    quantize: Literal[QUANTIZE_MODES] = "per_layer"
    noisy: ClassVar[bool] = False  # dithering is for activations

    @property
    def per_channel(self) -> bool:
        return self.quantize == "per_channel"


SPECS: dict[str, type[QuantSpec]] = {s.ROLE: s for s in (UnsignedActSpec, SignedActSpec, WeightSpec)}


def settings_of(role: str) -> frozenset[str]:
    """The setting names a quantizer of ``role`` takes (``symm_wts`` is accepted as ``symm``)."""
    return SPECS[role].setting_names()


def describe_error(error: dict) -> str:
    """One pydantic error of a settings model as a sentence that names the setting and what is allowed."""
    name = ".".join(str(part) for part in error["loc"])
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        close = difflib.get_close_matches(str(value), allowed.split(", "), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{name}={value!r} is not valid{hint}; allowed: {allowed}"
    if kind == "bool_type":
        return f"{name} must be true or false, got {value!r}"
    if kind in ("float_type", "finite_number"):
        return f"{name} must be a finite number, got {value!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{name} must be {bounds[kind]} {limit:g}, got {value!r}"
    return f"{name}: {error['msg'].lower()}, got {value!r}"
