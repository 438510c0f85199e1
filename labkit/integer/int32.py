"""int32 requantization: the integer twin as a 32-bit integer device computes it.

A device kernel such as Deeploy's RequantShift (Generic platform) runs ``y = clip(floor((x mul + add) / 2^d))`` as

    t = x * mul;  t += add - h;  t += h;  y = clip(t >> d, lo, hi)        (h = 2^(d-1), 0 when d = 0)

with every partial sum in int32. It is exact when, for every input ``x`` the layer can receive,

    bound = max |x mul| + |add - h| + h  <=  2^31 - 1                      (covers |x mul| + |add| as well)

For each requantization :func:`int32_twin` takes the largest shift ``d32 <= d`` for which this holds,
``mul32 = round(mul 2^(d32 - d))``, ``add32 = round(add 2^(d32 - d))`` (exact integer rounding, half up).
The interval of ``x`` is **proven** by default: propagated through the integer graph from the input grid
(conv/linear per output channel ``sum_k min(w_k lo, w_k hi) .. sum_k max(w_k lo, w_k hi)`` + bias over the
input codes ``lo..hi``; a sum pool multiplies by the window; an adder's output requantization sees the sum
of its inputs' code ranges), so no input on the grid can overflow. With ``calibration`` data the interval is
``|x| <= margin * max |x|`` seen per channel (capped by the proven one): larger shifts, not proven; the twin
then checks every partial sum as it runs and raises on an overflow.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from labkit.config.tables import Table
from labkit.integer.modules import (
    IntAdd,
    IntConv2d,
    IntegerizeError,
    IntLinear,
    IntSumPool,
    QuantizeInput,
    Requant,
    _channel_view,
    requant_layers,
)

__all__ = ["INT32_MAX", "Int32Requant", "Int32Plan", "int32_twin", "input_intervals", "calibrated_intervals"]

INT32_MAX = 2 ** 31 - 1


def _half(d: int) -> int:
    return 1 << (d - 1) if d > 0 else 0


class Int32Requant(Requant):
    """:class:`Requant` computed as a 32-bit device does (module docstring); raises on an int32 overflow."""

    def __init__(self, mul, add, d, lo, hi, eps_out, signed, n_levels, name: str = "", proven: bool = True):
        super().__init__(mul, add, d, lo, hi, eps_out, signed, n_levels, reduce=False)  # d: the shift chosen
        self.name, self.proven = name, proven

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x * _channel_view(self.mul, x)
        t = p + _channel_view(self.add, x)
        if x.numel():
            peak = max(int(p.abs().max()), int(t.abs().max()), int((t - _half(self.d)).abs().max()))
            if peak > INT32_MAX:
                raise IntegerizeError(
                    f"int32 requantization '{self.name}' overflows: a partial sum reached {peak} > 2^31-1 "
                    + ("(a proven bound was violated: the input is not on the network's input grid)" if self.proven
                       else "(its calibrated bound does not hold for this input): use a larger margin, or no "
                            "calibration for bounds proven on the whole input grid"))
        return (t >> self.d).clamp_(self.lo, self.hi)


@dataclass
class Int32Plan:
    """Per requantization (graph order): interval of its input, shifts (int64 twin ``d``, int32 ``d32``),
    the int32 ``bound`` and the headroom ``2^31 - 1 - bound`` (also in bits)."""

    layers: list[dict]
    margin: float | None  # None: proven bounds

    COLUMNS = ("layer", "bounds", "acc_lo", "acc_hi", "d", "d32", "mul_bits", "bound", "headroom", "headroom_bits")

    @property
    def worst(self) -> dict:
        return min(self.layers, key=lambda r: r["headroom"])

    def summary(self) -> str:
        how = "proven on the input grid" if self.margin is None else f"calibrated, margin x{self.margin:g}"
        d32 = [r["d32"] for r in self.layers]
        return (f"{len(self.layers)} int32 requantizations ({how}): d32 {min(d32)}..{max(d32)}, least headroom "
                f"{self.worst['headroom_bits']:.3f} bits in '{self.worst['layer']}'")

    def table(self) -> Table:
        return Table(self.layers, self.COLUMNS, title=self.summary())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return str(self.table())


# ------------------------------------------------------------------------------------------ intervals
@torch.no_grad()
def _input_shapes(inet: fx.GraphModule) -> dict[str, tuple]:
    """Input shape of every sum pool (one forward pass on zeros)."""
    shapes, hooks = {}, []
    for name, m in inet.named_modules():
        if isinstance(m, IntSumPool):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
    try:
        inet(torch.zeros((1, *inet.input_quant.out_shape)))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _linear_interval(m: IntConv2d | IntLinear, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.weight.flatten(1)
    a, b = w * lo, w * hi
    out_lo, out_hi = torch.minimum(a, b).sum(1), torch.maximum(a, b).sum(1)
    if m.bias is not None:
        out_lo, out_hi = out_lo + m.bias, out_hi + m.bias
    return out_lo, out_hi


def input_intervals(inet: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Requantization name -> ``(lo, hi)`` (int64, per channel or scalar): every value its input can take for any
    input on the network's input grid (module docstring)."""
    mods = dict(inet.named_modules())
    pool_shapes = _input_shapes(inet)
    env: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    out = {}

    def codes(r) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(r.lo), torch.tensor(r.hi)

    for node in inet.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_module" or isinstance(mods[node.target], nn.Flatten):
            env[node] = env[node.args[0]]  # flatten / reshape: the values pass unchanged
            continue
        m = mods[node.target]
        x = env.get(node.args[0])
        if isinstance(m, QuantizeInput):
            env[node] = codes(m)
        elif isinstance(m, (IntConv2d, IntLinear)):
            env[node] = _linear_interval(m, int(x[0].min()), int(x[1].max()))
        elif isinstance(m, Requant):
            out[node.target], env[node] = x, codes(m)
        elif isinstance(m, IntSumPool):
            n, c, h, w = pool_shapes[node.target]
            k = m.kernel_size or (h, w)
            env[node] = (x[0] * k[0] * k[1], x[1] * k[0] * k[1])
        elif isinstance(m, IntAdd):
            for i, arg in enumerate(node.args):
                out[f"{node.target}.acts.{i}"] = env[arg]
            out[f"{node.target}.act_out"] = (torch.tensor(sum(r.lo for r in m.acts)),
                                             torch.tensor(sum(r.hi for r in m.acts)))
            env[node] = codes(m.act_out)
        else:
            raise IntegerizeError(f"int32: no interval rule for module '{node.target}' ({type(m).__name__})")
    return out


@torch.no_grad()
def calibrated_intervals(inet: fx.GraphModule, batches, margin: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Requantization name -> ``(-M, M)`` per channel, ``M = margin * max |x|`` over the calibration inputs
    (``batches``: image tensors or ``(images, labels)`` pairs), capped by :func:`input_intervals`."""
    if not margin >= 1.0:
        raise IntegerizeError(f"int32: the calibration margin must be >= 1 (a factor on the largest value seen), "
                              f"got {margin}")
    peak: dict[str, torch.Tensor] = {}
    hooks = []
    for name, r in requant_layers(inet):
        def hook(_m, args, name=name):
            a = args[0].abs().transpose(0, 1).flatten(1).amax(1)
            peak[name] = a if name not in peak else torch.maximum(peak[name], a)
        hooks.append(r.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            inet(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
    if not peak:
        raise IntegerizeError("int32: the calibration data is empty")
    proven = input_intervals(inet)
    out = {}
    for name, (lo, hi) in proven.items():
        m = torch.ceil(peak[name].double() * margin).to(torch.int64)
        out[name] = (torch.maximum(lo, -m), torch.minimum(hi, m))
    return out


# ------------------------------------------------------------------------------------------ shifts
def _round_shift(v: int, k: int) -> int:
    """``round(v / 2^k)`` (half up) on exact integers; ``v 2^-k`` for ``k <= 0``."""
    return v << -k if k <= 0 else (v + (1 << (k - 1))) >> k


def _channels(t: torch.Tensor, n: int) -> list[int]:
    values = [int(v) for v in t.reshape(-1).tolist()]
    return values * n if len(values) == 1 else values


def _bound(mul: list[int], add: list[int], d: int, lo: list[int], hi: list[int]) -> int:
    h = _half(d)
    return max(max(abs(a * m), abs(b * m)) + abs(s - h) + h for m, s, a, b in zip(mul, add, lo, hi))


def _int32_layer(name: str, r: Requant, lo: torch.Tensor, hi: torch.Tensor, proven: bool) -> Int32Requant:
    n = max(r.mul.numel(), r.add.numel(), lo.numel(), hi.numel())
    mul, add, lo_c, hi_c = (_channels(t, n) for t in (r.mul, r.add, lo, hi))
    peak = max(max(abs(a), abs(b)) * abs(m) + abs(s) for m, s, a, b in zip(mul, add, lo_c, hi_c))
    start = min(r.d, max(0, r.d - (peak.bit_length() - 31) + 2))  # the bound halves with each step of d
    for d32 in range(start, -1, -1):
        mul32 = [_round_shift(m, r.d - d32) for m in mul]
        add32 = [_round_shift(a, r.d - d32) for a in add]
        if _bound(mul32, add32, d32, lo_c, hi_c) <= INT32_MAX:
            break
    else:
        raise IntegerizeError(f"int32: requantization '{name}' overflows int32 even with d=0 (its input reaches "
                              f"{min(lo_c)}..{max(hi_c)}): use fewer bits for the layers before it")
    if not any(mul32):
        raise IntegerizeError(f"int32: requantization '{name}' rounds every multiplier to 0 at d={d32} (its input "
                              f"reaches {min(lo_c)}..{max(hi_c)}): use fewer bits for the layers before it")
    if r.mul.dim() == 0 and r.add.dim() == 0:  # scalar stays scalar (per-channel intervals give equal values)
        mul_t, add_t = torch.tensor(mul32[0]), torch.tensor(add32[0])
    else:
        shape = r.mul.shape if r.mul.dim() else r.add.shape
        mul_t, add_t = torch.tensor(mul32).reshape(shape), torch.tensor(add32).reshape(shape)
    return Int32Requant(mul_t, add_t, d32, r.lo, r.hi, r.eps_out, r.signed, r.n_levels, name=name, proven=proven)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[child] = new


def int32_twin(inet: fx.GraphModule, calibration=None, margin: float = 2.0) -> tuple[fx.GraphModule, Int32Plan]:
    """A copy of ``inet`` whose requantizations run in int32 (module docstring), and its per-layer plan.

    ``calibration``: None for bounds proven on the whole input grid; or images / ``(images, labels)`` batches
    (e.g. a DataLoader) for the calibrated interval ``margin * max |x|``, not proven.
    """
    proven = calibration is None
    intervals = input_intervals(inet) if proven else calibrated_intervals(inet, calibration, margin)
    twin = copy.deepcopy(inet)
    rows = []
    for name, r in requant_layers(twin):
        lo, hi = intervals[name]
        new = _int32_layer(name, r, lo, hi, proven)
        _set_module(twin, name, new)
        n = max(new.mul.numel(), new.add.numel(), lo.numel(), hi.numel())
        lo_c, hi_c = _channels(lo, n), _channels(hi, n)
        bound = _bound(_channels(new.mul, n), _channels(new.add, n), new.d, lo_c, hi_c)
        rows.append({"layer": name, "bounds": "proven" if proven else "calibrated", "acc_lo": min(lo_c),
                     "acc_hi": max(hi_c), "d": r.d, "d32": new.d,
                     "mul_bits": round(math.log2(max(abs(int(new.mul.abs().max())), 1)), 2), "bound": bound,
                     "headroom": INT32_MAX - bound, "headroom_bits": round(math.log2(INT32_MAX / max(bound, 1)), 3)})
    twin.eps_in, twin.output_scale = inet.eps_in, inet.output_scale
    return twin, Int32Plan(rows, None if proven else float(margin))
