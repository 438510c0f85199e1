"""The CMSIS (Cortex-M) twin: each conv/linear/pool requantization as Deeploy v0.2.1's CMSIS platform computes
it once it has merged the layer with its RequantShift (docs/export.md gives the source lines):

    y = clip(floor(((acc + k) * m + 2^(D-1)) / 2^D))        k: int32 bias in accumulator units, 64-bit product

Deeploy reads ``mul = m``, ``add = k m`` and ``div = 2^D`` from the RequantShift, recovers
``k = round(add / (mul + 1e-3))``, and hands CMSIS-NN ``multiplier = m 2^(31-D)`` with ``shift = 0``, so
that ``arm_nn_requantize(acc + k, multiplier, 0) = (int64 (acc + k) multiplier + 2^30) >> 31`` is the formula
above.
:func:`cmsis_requant` chooses, for the exact requantization ``floor((acc mul + add) / 2^d)``,

    m = round(mul 2^(D-d)),   k = round((add - 2^(d-1)) 2^(D-d) / m)       (half to even, exact rationals)

with the largest ``D <= 31`` for which, on the proven input interval ``lo..hi`` of every channel,

* ``-2^31 <= m 2^(31-D) <= 2^31 - 1`` (the multiplier is an int32; refused when ``mul >= 2^d``, one output
  code or more per accumulator unit) and Deeploy's own arithmetic gives back exactly ``k`` and that
  multiplier;
* ``|acc + k| <= 2^31 - 1`` for every partial sum (CMSIS-NN starts the accumulator at ``k``; the interval
  contains 0, so the partial sums lie in ``k + lo .. k + hi``) - the **bound**;
* ``(|acc| + |k|) |m| + 2^(D-1) < 2^53``: float64 (the onnxruntime check, Deeploy's ``add / mul``) is
  exact.

The bias moves by up to ``|m| / 2^(D+1)`` output codes (half a step of ``k``): that, not the multiplier,
limits the precision; the plan's ``error`` is the proven largest difference of the value before the floor.
Requantizations that are not merged (an adder's code input and its output) stay
:func:`labkit.integer.int32_layer.int32_requant` (one shift, no pre-clip: Deeploy's Generic kernel).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import torch
from torch import fx

from labkit.integer.int32 import Int32Plan, _set_module, constant_image_points, input_intervals
from labkit.integer.int32_layer import (
    INT32_MAX,
    Int32Requant,
    _channels,
    _Channels,
    _half,
    _window,
    int32_requant,
)
from labkit.integer.modules import (
    IntAdd,
    IntConv2d,
    IntegerizeError,
    IntLinear,
    IntSumPool,
    Requant,
    _channel_view,
    requant_layers,
)

__all__ = ["CMSIS_MAX_SHIFT", "CmsisPlan", "CmsisRequant", "cmsis_requant", "cmsis_twin",
           "deeploy_cmsis_constants", "merged_requants"]

CMSIS_MAX_SHIFT = 31  # totalShift = 31 - D >= 0
FLOAT64_EXACT = 2 ** 53


class CmsisRequant(Int32Requant):
    """``clip(floor(((x + bias) mul + 2^(d-1)) / 2^d))`` (module docstring), ``add = bias mul + 2^(d-1)``;
    raises when ``x + bias`` leaves int32."""

    def __init__(self, mul, bias, d, lo, hi, eps_out, signed, n_levels, name: str = ""):
        mul, bias = torch.as_tensor(mul, dtype=torch.int64), torch.as_tensor(bias, dtype=torch.int64)
        super().__init__(mul, bias * mul + _half(d), d, lo, hi, eps_out, signed, n_levels, name=name)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.numel():
            return x.clone()
        t = x + _channel_view(self.bias, x)
        peak = max(int(t.abs().max()), int(x.abs().max()))
        if peak > INT32_MAX:
            raise IntegerizeError(f"CMSIS requantization '{self.name}' overflows: acc + bias reached "
                                  f"{peak} > 2^31-1 (a proven bound was violated: the input is not on the "
                                  "network's input grid)")
        return ((t * _channel_view(self.mul, x) + _half(self.d)) >> self.d).clamp_(self.lo, self.hi)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", CMSIS (bias before the multiply)"


def deeploy_cmsis_constants(mul: np.ndarray, add: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, float]:
    """What Deeploy's ``_merge_conv_rq_fun`` (CortexM ``TopologyOptimizationPasses/Passes.py`` v0.2.1, lines
    12-30) makes of a RequantShift's ``mul``, ``add``, ``div = 2^d``, in its numpy arithmetic: the bias, the
    multiplier and the remaining shift handed to CMSIS-NN."""
    mul, add = np.asarray(mul), np.asarray(add)
    total = 31 - np.log2(np.float64(2.0 ** d))
    bias = np.round(add / (mul + 1e-3))
    with np.errstate(divide="ignore"):
        mult_shift = min(total, np.floor(32 - np.log2(mul.max())))
    return bias, mul * 2 ** mult_shift, float(total - mult_shift)


def _constants(ch: _Channels, big: int) -> tuple[list[int], list[int]]:
    """``m``, ``k`` per channel at shift ``big`` (module docstring)."""
    ms, ks = [], []
    for mul, add in zip(ch.mul, ch.add):
        m = round(Fraction(mul) * Fraction(2) ** (big - ch.d))
        ks.append(round(Fraction(add - _half(ch.d)) * Fraction(2) ** (big - ch.d) / m) if m else 0)
        ms.append(m)
    return ms, ks


def _error(mul: int, add: int, m: int, k: int, d: int, big: int, x_lo: int, x_hi: int) -> float:
    """``max |((x + k) m + 2^(D-1)) / 2^D - (x mul + add) / 2^d|`` over ``x_lo..x_hi`` (codes; 0: empty)."""
    if x_lo > x_hi:
        return 0.0
    return float(max(abs(Fraction((x + k) * m + _half(big), 2 ** big) - Fraction(x * mul + add, 2 ** d))
                     for x in (x_lo, x_hi)))


def _unfit(ch: _Channels, ms: list[int], ks: list[int], big: int) -> str:
    """Why shift ``big`` breaks the multiplier, float64 or merge-pass conditions of the module docstring ("":
    it does not; the int32 bound is checked apart)."""
    if max(ms) <= 0 or max(ms) << (31 - big) > INT32_MAX or min(ms) << (31 - big) < -INT32_MAX - 1:
        return (f"its multipliers are {min(ch.mul) / 2 ** ch.d:.4g}..{max(ch.mul) / 2 ** ch.d:.4g} output "
                "codes per accumulator unit, and the CMSIS lowering needs 0 < max mul < 2^d (an int32 "
                "multiplier mul 2^(31-d)); quantize its output with a larger step (fewer bits or a wider "
                "range), or use --target deeploy (Generic)")
    if any((max(abs(lo), abs(hi)) + abs(k)) * abs(m) + _half(big) >= FLOAT64_EXACT
           for m, k, lo, hi in zip(ms, ks, ch.lo, ch.hi)):
        return ("(|acc| + |k|) |m| reaches 2^53, beyond float64's exact integers (Deeploy's merge pass, the "
                "onnxruntime check); use fewer bits for the layers before it")
    m64 = np.array(ms, dtype=np.int64)
    bias, mult, shift = deeploy_cmsis_constants(m64.astype(np.int32), m64 * np.array(ks, dtype=np.int64), big)
    if not (np.array_equal(bias, ks) and shift == 0 and np.array_equal(mult, m64 << (31 - big))):
        return (f"Deeploy's merge pass would not give back its biases (round(k m / (m + 1e-3)) = k needs "
                f"|k| below about 500 m; k reaches {max(ks, key=abs)} for m {min(ms, key=abs)}): its output "
                "offsets are too large for its multipliers; use --target deeploy (Generic)")
    return ""


def cmsis_requant(r: Requant, lo: torch.Tensor, hi: torch.Tensor, *,
                  name: str = "") -> tuple[CmsisRequant, dict]:
    """The CMSIS form of requantization ``r`` for the proven input interval ``lo..hi`` (per channel or
    scalar), and its plan row (the int32 plan's columns: ``d32`` is ``D``, ``bound`` the largest
    ``|acc + k|``, ``error`` the proven difference to the exact value before the floor, in codes)."""
    n = max(r.mul.numel(), r.add.numel(), lo.numel(), hi.numel())
    ch = _Channels(*(_channels(t, n) for t in (r.mul, r.add, lo, hi)), r.d)
    first = ""
    for big in range(CMSIS_MAX_SHIFT, -1, -1):
        ms, ks = _constants(ch, big)
        if not (why := _unfit(ch, ms, ks, big)):
            break
        first = first or why
    else:
        raise IntegerizeError(f"CMSIS: requantization '{name}' cannot be written for Deeploy's CMSIS "
                              f"platform: {first}")
    bound = max(max(abs(a + k), abs(b + k)) for k, a, b in zip(ks, ch.lo, ch.hi))
    if bound > INT32_MAX:
        c = max(range(n), key=lambda i: max(abs(ch.lo[i] + ks[i]), abs(ch.hi[i] + ks[i])))
        raise IntegerizeError(
            f"CMSIS: requantization '{name}' overflows int32: channel {c}'s accumulator "
            f"{ch.lo[c]}..{ch.hi[c]} plus its bias {ks[c]} reaches {bound} > 2^31-1; use fewer bits "
            "for the layers before it")
    top, bot = _window(ch, r.lo, r.hi)
    error = max(_error(mul, add, m, k, ch.d, big, max(x_lo, b), min(x_hi, t))
                for mul, add, m, k, x_lo, x_hi, t, b in zip(ch.mul, ch.add, ms, ks, ch.lo, ch.hi, top, bot))
    scalar = n == 1 and r.mul.dim() == 0 and r.add.dim() == 0
    module = CmsisRequant(ms[0] if scalar else ms, ks[0] if scalar else ks, big, r.lo, r.hi, r.eps_out,
                          r.signed, r.n_levels, name=name)
    nonzero = [abs(m) for m in ms if m]
    row = {"layer": name, "form": "cmsis", "bounds": "proven", "acc_lo": min(ch.lo), "acc_hi": max(ch.hi),
           "d": r.d, "d32": big, "d32_max": big, "groups": 1, "preclip": "", "nodes": 1,
           "mul_bits": round(math.log2(min(nonzero)), 2) if nonzero else 0.0, "error": error,
           "flat_pct": None, "bound": bound, "headroom": INT32_MAX - bound,
           "headroom_bits": round(math.log2(INT32_MAX / max(bound, 1)), 3)}
    return module, row


class CmsisPlan(Int32Plan):
    """:class:`Int32Plan` of a CMSIS twin: ``form`` ``cmsis`` (merged with its conv/linear/pool, module
    docstring) or ``int32`` (Deeploy's Generic kernel)."""

    COLUMNS = ("layer", "form") + Int32Plan.COLUMNS[1:]

    def summary(self) -> str:
        merged = [r for r in self.layers if r["form"] == "cmsis"]
        worst = max(self.layers, key=lambda r: r["error"])
        return (f"{len(self.layers)} requantizations for Deeploy's CMSIS platform ({len(merged)} merged with "
                f"their conv/linear/pool: bias before the multiply, D {min(r['d32'] for r in merged)}.."
                f"{max(r['d32'] for r in merged)}; {len(self.layers) - len(merged)} int32 RequantShift), "
                f"proven on the input grid, largest proven error {worst['error']:.2g} codes in "
                f"'{worst['layer']}', least headroom {self.worst['headroom_bits']:.3f} bits in "
                f"'{self.worst['layer']}'"
                + (f"; vs exact twin on {self.agreement}" if self.agreement else ""))


def merged_requants(inet: fx.GraphModule) -> set[str]:
    """Names of the requantizations whose input is a conv, linear or sum pool output: Deeploy's CMSIS lowering
    merges those with the layer (an adder's ``acts.i`` included when input ``i`` is such a layer)."""
    mods = dict(inet.named_modules())

    def accumulator(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and \
            isinstance(mods[node.target], (IntConv2d, IntLinear, IntSumPool))

    out = set()
    for node in inet.graph.nodes:
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, Requant) and accumulator(node.args[0]):
            out.add(node.target)
        elif isinstance(m, IntAdd):
            out.update(f"{node.target}.acts.{i}" for i, a in enumerate(node.args) if accumulator(a))
    return out


def cmsis_twin(inet: fx.GraphModule, flat: bool = True) -> tuple[fx.GraphModule, CmsisPlan]:
    """A copy of ``inet`` as Deeploy's CMSIS platform computes it: :func:`cmsis_requant` for every merged
    requantization (:func:`merged_requants`), :func:`labkit.integer.int32_layer.int32_requant` with one shift
    and no pre-clip for the others (``flat``: as :func:`labkit.integer.int32.int32_twin`); proven bounds."""
    intervals = input_intervals(inet)
    merged = merged_requants(inet)
    points = constant_image_points(inet) if flat else {}
    twin = copy.deepcopy(inet)
    rows = []
    for name, r in requant_layers(twin):
        lo, hi = intervals[name]
        if name in merged:
            new, row = cmsis_requant(r, lo, hi, name=name)
        else:
            new, row = int32_requant(r, lo, hi, name=name, max_groups=1, preclip=False,
                                     points=points.get(name))
            row = {"form": "int32", **row}
        _set_module(twin, name, new)
        rows.append(row)
    twin.eps_in, twin.output_scale = inet.eps_in, inet.output_scale
    return twin, CmsisPlan(rows, None)
