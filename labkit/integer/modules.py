"""Integer layers: every tensor they pass is int64 (the input quantizer takes the float image).

``QuantizeInput`` (image -> codes), ``IntConv2d`` / ``IntLinear`` (integer weights, exact accumulators),
``Requant`` (``y = clip(floor((acc * mul + add) / 2^d), lo, hi)``, a pure shift when ``mul`` is a power of
two), ``IntAdd`` (requantized inputs added, sum requantized) and ``IntSumPool`` (integer window sums).
:func:`labkit.integer.integerize.integerize` builds a network of them from a harmonized fake-quant network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from labkit.config.errors import LabkitError


class IntegerizeError(LabkitError, ValueError):
    """The network cannot be integerized as it is; the message names the node and what to change."""


def _channel_view(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (dim 1 of ``t``) shaped to broadcast against ``t``; scalars pass unchanged."""
    if v.dim() == 0:
        return v
    return v.view(1, -1, *([1] * (t.dim() - 2)))


class QuantizeInput(nn.Module):
    """``c = clip(floor(x / eps + 1/2), lo, hi)``: float input (normalised image) -> int64 codes."""

    def __init__(self, eps: float, lo: int, hi: int):
        super().__init__()
        self.eps, self.lo, self.hi = float(eps), int(lo), int(hi)
        self.bits = math.ceil(math.log2(self.hi - self.lo + 1))
        self.out_shape: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.floor(x.double() / self.eps + 0.5), self.lo, self.hi).to(torch.int64)

    def extra_repr(self) -> str:
        return f"eps={self.eps:.6g}, codes {self.lo}..{self.hi}"


class _IntLinearBase(nn.Module):
    """Integer weight codes (int64 buffer) and optional integer bias; output = int64 accumulator."""

    def _setup(self, weight_codes: torch.Tensor, bias_codes: torch.Tensor | None, w_bits: int, in_bits: int):
        self.register_buffer("weight", weight_codes.to(torch.int64))
        self.register_buffer("bias", None if bias_codes is None else bias_codes.to(torch.int64))
        self.w_bits, self.in_bits = int(w_bits), int(in_bits)
        self.out_shape: tuple = ()
        self.macs = 0  # per sample, set from the traced shapes
        self.exact_float32 = False  # every partial sum below 2^24 in magnitude: float32 arithmetic is exact

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.exact_float32 else torch.float64

    def _operands(self, x: torch.Tensor):
        dt = self.compute_dtype
        return x.to(dt), self.weight.to(dt), (None if self.bias is None else self.bias.to(dt))


class IntConv2d(_IntLinearBase):
    """Conv2d on integer codes: float64 arithmetic on integer values (exact: bounded below 2^53) -> int64."""

    def __init__(self, weight_codes, bias_codes, stride, padding, dilation, groups, w_bits, in_bits):
        super().__init__()
        self._setup(weight_codes, bias_codes, w_bits, in_bits)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = self._operands(x)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups).to(torch.int64)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel={tuple(self.weight.shape[2:])}, stride={self.stride}, groups={self.groups}, "
                f"w_bits={self.w_bits}")


class IntLinear(_IntLinearBase):
    """Linear layer on integer codes with integer bias -> int64 accumulator."""

    def __init__(self, weight_codes, bias_codes, w_bits, in_bits):
        super().__init__()
        self._setup(weight_codes, bias_codes, w_bits, in_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self._operands(x)).to(torch.int64)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, w_bits={self.w_bits}"


class Requant(nn.Module):
    """``y = clip(floor((x * mul + add) / 2^d), lo, hi)`` on int64, ``mul``/``add`` per channel or scalar.

    When ``mul`` is one power of two ``2^k`` the requantization is a pure shift and runs as
    ``((x << a) + c) >> s`` (``shift`` holds ``(a, c, s)``), with exactly the same result.
    ``eps_out`` is the step of the output grid (the fake-quant quantizer it replaces). ``rounding_d``: the
    shift at which ``mul`` and ``add`` were rounded (before the reduction), so ``floor`` sees the real value +
    1/2 within ``(|x| + 1) / 2^(rounding_d + 1)``.
    """

    def __init__(self, mul: torch.Tensor, add: torch.Tensor, d: int, lo: int, hi: int, eps_out: float,
                 signed: bool, n_levels: int, reduce: bool = True):
        super().__init__()
        mul, add, d = mul.to(torch.int64), add.to(torch.int64), int(d)
        self.rounding_d = d
        if reduce:  # the same function with the smallest constants
            mul, add, d = _reduce_pow2(mul, add, d)
        self.register_buffer("mul", mul)
        self.register_buffer("add", add)
        self.d, self.lo, self.hi = d, int(lo), int(hi)
        self.eps_out, self.signed, self.n_levels = float(eps_out), bool(signed), int(n_levels)
        self.bits = math.ceil(math.log2(n_levels))
        self.shift = _as_shift(mul, add, d)
        self.out_shape: tuple = ()

    @property
    def div(self) -> int:
        return 1 << self.d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            a, c, s = self.shift
            y = x << a if a else x.clone()
            if isinstance(c, torch.Tensor):
                y += _channel_view(c, x)
            elif c:
                y += c
            if s:
                y >>= s
        else:
            y = x * _channel_view(self.mul, x)
            y += _channel_view(self.add, x)
            y >>= self.d
        return y.clamp_(self.lo, self.hi)

    def extra_repr(self) -> str:
        form = (
            "shift" if self.shift is not None else f"mul {'per channel' if self.mul.dim() else int(self.mul)}"
        )
        return f"{form}, d={self.d}, codes {self.lo}..{self.hi}, eps_out={self.eps_out:.6g}"


class IntAdd(nn.Module):
    """Integer residual add: ``act_out(sum_i acts[i](x_i))``; inputs requantized to one common eps."""

    def __init__(self, acts: list[Requant], act_out: Requant):
        super().__init__()
        self.acts = nn.ModuleList(acts)
        self.act_out = act_out

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = self.acts[0](xs[0])
        for act, x in zip(self.acts[1:], xs[1:]):
            total = total + act(x)
        return self.act_out(total)


class IntSumPool(nn.Module):
    """Integer sum over each pooling window (global pool: over H and W), keeps dims; the following
    requantization divides by the window size."""

    def __init__(self, kernel_size: tuple | None = None, stride: tuple | None = None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size is None:
            return x.sum(dim=(2, 3), keepdim=True)
        return (F.avg_pool2d(x.double(), self.kernel_size, self.stride, divisor_override=1)).to(torch.int64)


def _reduce_pow2(mul: torch.Tensor, add: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Strip common factors of two from ``mul``, ``add`` and ``2^d`` (same function, smaller constants)."""
    while d > 0 and bool((mul % 2 == 0).all()) and bool((add % 2 == 0).all()):
        mul, add, d = mul // 2, add // 2, d - 1
    return mul, add, d


def _as_shift(mul: torch.Tensor, add: torch.Tensor, d: int):
    """``(a, c, s)`` with ``floor((x mul + add) / 2^d) == ((x << a) + c) >> s`` when ``mul`` is one power of
    two."""
    values = mul.reshape(-1).unique()
    if values.numel() != 1 or int(values) <= 0 or int(values) & (int(values) - 1):
        return None
    k = int(values).bit_length() - 1
    if k >= d:  # floor((x 2^k + add) / 2^d) = x 2^(k-d) + floor(add / 2^d)
        c = add >> d
        return k - d, (int(c) if c.dim() == 0 else c), 0
    if bool((add % (1 << k) == 0).all()):  # floor((x + add / 2^k) / 2^(d-k))
        c = add >> k
        return 0, (int(c) if c.dim() == 0 else c), d - k
    return None


def integer_layers(inet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the integer network's layers in graph order (input, convs, requants, adds,
    pool)."""
    kinds = (QuantizeInput, IntConv2d, IntLinear, Requant, IntSumPool)
    return [(n, m) for n, m in inet.named_modules() if isinstance(m, kinds)]


def requant_layers(inet: fx.GraphModule) -> list[tuple[str, Requant]]:
    """``(name, Requant)`` in graph order; an adder contributes ``<name>.acts.<i>`` and ``<name>.act_out``."""
    mods = dict(inet.named_modules())
    out = []
    for node in inet.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        if isinstance(m, Requant):
            out.append((node.target, m))
        elif isinstance(m, IntAdd):
            out += [(f"{node.target}.acts.{i}", a) for i, a in enumerate(m.acts)]
            out.append((f"{node.target}.act_out", m.act_out))
    return out
