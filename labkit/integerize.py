"""Integerization: a harmonized fake-quantized network -> a network that computes on integers only.

:func:`integerize` walks the torch.fx graph of a trained, harmonized network (:func:`labkit.recipe.pact_recipe`)
and emits an integer twin with the same module names (quantization facts §4):

* **input**: ``c = clip(floor(x / eps_in + 1/2), -N/2, N/2 - 1)`` on a signed grid that covers the normalised
  input range (:func:`input_eps`); the only float operation, at the entry.
* **conv / linear**: integer weight codes ``round(w_q / eps_w)``, integer bias ``round(b / (eps_w eps_in))``;
  the accumulator ``acc = sum c_x c_w`` is exact (computed in float64 on integer values, bounded below 2^53).
* **(BN, activation)**: one per-channel requantization ``y = clip(floor((acc * mul + add) / 2^d), lo, hi)``
  with ``gamma' = gamma / sqrt(var + eps_bn)``, ``beta' = beta - mean gamma'``,
  ``mul = round(2^d gamma' eps_acc / eps_out)``, ``add = round(2^d (beta' / eps_out + 1/2))``: the rounding
  half-step is added once, in ``add``.
* **residual add**: each input is requantized to the adder's common eps (a code-to-code requantization,
  or the (BN, act) one when the input is a projection accumulator), the codes are added, and the sum is
  requantized to the output quantizer.
* **head**: the global average pool is an integer *sum* of codes; the pool quantizer's requantization divides
  by the window size (``mul = round(2^d eps / (H W eps_out))``): no float between pool and classifier.
* **shifts**: a requantization whose ``mul`` is a power of two (TQT ``pow2`` scales: adders, pool) is emitted as
  a pure shift ``(x << a) + c >> s`` with no multiplier.

``d`` is chosen per requantization (``d=None``): the largest value (at most ``d_max``) that keeps the worst-case
``|acc * mul| + |add|`` below 2^53, so the arithmetic is exact in int64 and in float64 (the ONNX export).
Small ``d`` (the reference uses 24) rounds ``mul`` coarsely and costs identical codes: :func:`compare` shows it.

Every tensor between the input quantizer and the output is int64. :func:`compare` checks the integer network
against its fake-quant twin element by element: per layer the share of identical codes and the largest code
difference, and the agreement of predictions.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct, QuantizerBase
from labkit.quant.functional import tqt_code_range

__all__ = [
    "IntegerizeError", "integerize", "compare", "Comparison", "input_eps", "input_range", "load_quantized",
    "integerize_checkpoint", "QuantizeInput", "IntConv2d", "IntLinear", "Requant", "IntAdd", "IntSumPool",
    "integer_layers", "requant_layers",
]

#: exactness limit of the requantization arithmetic (float64 mantissa: the ONNX export computes in double)
EXACT_BITS = 53
D_MAX = 48

_PASS_MODULES = (nn.Flatten, nn.Unflatten)
_DROP_MODULES = (nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, torch.reshape}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_ACTS = (PACTUnsignedAct, PACTAsymmetricAct)


class IntegerizeError(ValueError):
    """The network cannot be integerized as it is; the message names the node and what to change."""


# =========================================================================================== integer modules
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
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, groups={self.groups}, w_bits={self.w_bits}")


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
    ``eps_out`` is the step of the output grid (the fake-quant quantizer it replaces).
    """

    def __init__(self, mul: torch.Tensor, add: torch.Tensor, d: int, lo: int, hi: int, eps_out: float,
                 signed: bool, n_levels: int):
        super().__init__()
        mul, add, d = _reduce_pow2(mul.to(torch.int64), add.to(torch.int64), int(d))
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
        form = "shift" if self.shift is not None else f"mul {'per channel' if self.mul.dim() else int(self.mul)}"
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
    """``(a, c, s)`` with ``floor((x mul + add) / 2^d) == ((x << a) + c) >> s`` when ``mul`` is one power of two."""
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
    """``(name, module)`` of the integer network's layers in graph order (input, convs, requants, adds, pool)."""
    kinds = (QuantizeInput, IntConv2d, IntLinear, Requant, IntSumPool)
    return [(n, m) for n, m in inet.named_modules() if isinstance(m, kinds)]


# =========================================================================================== input grid
def input_range(cfg_or_data: dict | str) -> tuple[float, float]:
    """(lo, hi) of the normalised inputs: images in [0, 1] normalised by the dataset's mean and std.

    ``cfg_or_data``: a resolved config, its ``data`` section, or the dataset name (``embedded``, ``imagenet``).
    """
    name = cfg_or_data if isinstance(cfg_or_data, str) else \
        (cfg_or_data.get("data", cfg_or_data)).get("name", "imagenet")
    if name == "embedded":
        from labkit.data import _embedded_arrays

        _, _, mean, std = _embedded_arrays()
        means, stds = (mean,), (std,)
    elif name == "imagenet":
        from labkit.data import IMAGENET_MEAN, IMAGENET_STD

        means, stds = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise IntegerizeError(f"input_range: unknown dataset {name!r}; pass eps_in yourself "
                              "(input_eps(lo, hi) for inputs normalised to [lo, hi])")
    return min((0 - m) / s for m, s in zip(means, stds)), max((1 - m) / s for m, s in zip(means, stds))


def input_eps(lo: float, hi: float, bits: int = 8, pow2: bool = False) -> float:
    """Step of the signed ``bits`` grid (codes ``-2^(b-1) .. 2^(b-1)-1``, zero exact) covering ``[lo, hi]``;
    ``pow2`` rounds it up to a power of two."""
    half = 2 ** (bits - 1)
    eps = max(-float(lo) / half, float(hi) / (half - 1), 1e-12)
    return 2.0 ** math.ceil(math.log2(eps)) if pow2 else eps


# =========================================================================================== integerize
@dataclass
class _Val:
    """What flows along an edge of the integer graph: an int64 tensor ``t`` whose real value is
    ``scale * t + shift`` (per channel), with ``|t| <= bound``."""

    node: fx.Node
    kind: str  # "codes" (on a quantizer grid) or "acc" (accumulator, maybe with a pending BN)
    scale: torch.Tensor
    shift: torch.Tensor
    bound: torch.Tensor
    origin: str
    bits: int = 32


def integerize(qnet: nn.Module, eps_in: float, input_shape: tuple, *, input_bits: int = 8, d: int | None = None,
               d_max: int = D_MAX) -> fx.GraphModule:
    """The integer twin of the harmonized fake-quant network ``qnet`` (module docstring).

    ``eps_in``: step of the input grid (:func:`input_eps` of :func:`input_range`); ``input_shape``:
    ``(N, C, H, W)`` of one input batch (fixes pooling windows and the size report). ``d``: one requantization
    shift for every layer (e.g. 24 as the reference export), or ``None`` for the most exact choice per
    requantization. ``qnet`` is not modified. Returns a :class:`torch.fx.GraphModule` whose modules carry the
    names of the layers they replace; its output is the int64 accumulator of the last layer (logits in units
    of ``inet.output_scale``), ``inet.input_quant`` quantizes the float input.
    """
    builder = _Builder(qnet, float(eps_in), tuple(input_shape), int(input_bits), d, int(d_max))
    return builder.build()


class _Builder:
    def __init__(self, qnet, eps_in, input_shape, input_bits, d, d_max):
        if not isinstance(qnet, nn.Module):
            raise TypeError(f"integerize: expected a torch.nn.Module, got {type(qnet).__name__}")
        if not eps_in > 0:
            raise IntegerizeError(f"integerize: eps_in must be > 0, got {eps_in}")
        if d is not None and not (isinstance(d, int) and 1 <= d <= 62):
            raise IntegerizeError(f"integerize: d must be an integer in 1..62 or None (automatic), got {d!r}")
        self.qnet, self.eps_in, self.input_shape, self.input_bits = qnet, eps_in, input_shape, input_bits
        self.d, self.d_max = d, d_max
        self.modules: dict[str, nn.Module] = {}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}

    # ------------------------------------------------------------------ graph of the fake-quant net
    def _trace(self) -> tuple[fx.GraphModule, bool]:
        from labkit.harmonize import META_KEY, QuantTracer

        harmonized = isinstance(self.qnet, fx.GraphModule) and META_KEY in getattr(self.qnet, "meta", {})
        if isinstance(self.qnet, fx.GraphModule):
            return self.qnet, harmonized
        try:
            graph = QuantTracer().trace(self.qnet)
        except Exception as err:  # noqa: BLE001
            raise IntegerizeError(f"integerize: torch.fx cannot trace {type(self.qnet).__name__} ({err}); build the "
                                  "network with labkit.recipe.pact_recipe (it harmonizes and traces)") from err
        return fx.GraphModule(self.qnet, graph), harmonized

    def _hint(self) -> str:
        if self.harmonized:
            return ""
        return (" This network was not harmonized: run labkit.harmonize.harmonize(net) after the recipe "
                "(or pact_recipe with network.quantize.harmonize enabled) and train/fine-tune it that way.")

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"node '{node.name}' ({type(self.qmods[node.target]).__name__} '{node.target}')"
        target = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {target})"

    def build(self) -> fx.GraphModule:
        gm, self.harmonized = self._trace()
        self.qmods = dict(gm.named_modules())
        self._check_started()
        # the steps (eps) are taken as the network computes them in its own dtype (float32: the grids it was
        # trained and evaluated on); folding and multipliers are computed in float64 from them
        self._shapes(gm)
        was = self.qnet.training
        self.qnet.eval()
        try:
            for node in gm.graph.nodes:
                self.env[node] = self._visit(node)
        finally:
            self.qnet.train(was)
        from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

        inet = fx.GraphModule(self.modules, self.graph, class_name="IntegerNet")
        inet.eps_in = self.eps_in
        inet.output_scale = self.output_scale
        inet.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {"eps_in": self.eps_in, "output_scale": self.output_scale}
        inet.eval()
        return inet

    def _check_started(self) -> None:
        for name, m in self.qmods.items():
            if isinstance(m, QuantizerBase) and not m.started:
                raise IntegerizeError(
                    f"integerize: quantizer '{name}' ({type(m).__name__}) has not started, it still runs in float: "
                    "integerize a network after quantization-aware training (load its checkpoint), or call "
                    "start() on its quantizers (the training controllers do it by their schedule)")

    def _shapes(self, gm: fx.GraphModule) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        param = next(gm.parameters(), None)
        x = torch.zeros(self.input_shape, dtype=param.dtype if param is not None else None,
                        device=param.device if param is not None else None)
        was = gm.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        gm.train(was)
        self.shape = {n: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                      if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}

    # ------------------------------------------------------------------ node visitors
    def _add_module(self, name: str, module: nn.Module, args: tuple, shape: tuple | None = None) -> fx.Node:
        self.modules[name] = module
        if shape is not None and hasattr(module, "out_shape"):
            module.out_shape = tuple(shape[1:])
        return self.graph.call_module(name, args=args)

    def _arg(self, node: fx.Node, arg: Any, what: str = "input") -> _Val:
        if not isinstance(arg, fx.Node) or arg not in self.env or not isinstance(self.env[arg], _Val):
            raise IntegerizeError(f"integerize: {self._describe(node)}: its {what} {arg!r} is not a tensor of the "
                                  "network; only tensor-to-tensor layers can be integerized")
        return self.env[arg]

    def _visit(self, node: fx.Node):
        if node.op == "placeholder":
            if self.env:
                raise IntegerizeError(f"integerize: the network takes more than one input ('{node.name}'); "
                                      "only single-input networks are supported")
            x = self.graph.placeholder(node.name)
            half = 2 ** (self.input_bits - 1)
            q = QuantizeInput(self.eps_in, -half, half - 1)
            out = self._add_module("input_quant", q, (x,), self.shape.get(node))
            return self._codes(out, self.eps_in, -half, half - 1, "the input quantizer")
        if node.op == "output":
            return self._output(node)
        if node.op == "get_attr":
            raise IntegerizeError(f"integerize: {self._describe(node)} reads a float tensor attribute inside the "
                                  "graph; fold it into a layer")
        if node.op == "call_module":
            m = self.qmods[node.target]
            if isinstance(m, PACTConv2d):
                return self._conv(node, m)
            if isinstance(m, PACTLinear):
                return self._linear(node, m)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return self._batchnorm(node, m)
            if isinstance(m, _ACTS):
                return self._act(node, m)
            if isinstance(m, PACTIntegerAdd):
                return self._integer_add(node, m)
            if isinstance(m, _POOLS):
                return self._pool(node, m)
            if isinstance(m, _DROP_MODULES):
                return self._arg(node, node.args[0])
            if isinstance(m, _PASS_MODULES):
                v = self._arg(node, node.args[0])
                new = self._add_module(node.target, type(m)(*_flatten_args(m)), (v.node,))
                return _replace(v, new)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                raise IntegerizeError(
                    f"integerize: {self._describe(node)} is not quantized: add it to network.quantize "
                    f"({'PACTConv2d' if isinstance(m, nn.Conv2d) else 'PACTLinear'}) and fine-tune")
            raise self._float_op(node)
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            raise IntegerizeError(
                f"integerize: {self._describe(node)} in '{node.meta.get('labkit_scope') or 'the root'}' adds two "
                "tensors in float: harmonize the network so the add becomes a PACTIntegerAdd (inputs on one "
                "common eps)." + (self._hint() or " Was a quantizer removed after harmonization?"))
        if (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _PASS_METHODS):
            v = self._arg(node, node.args[0])
            rest = tuple(a for a in node.args[1:])
            if any(isinstance(a, fx.Node) for a in rest) or any(isinstance(a, fx.Node) for a in node.kwargs.values()):
                raise IntegerizeError(f"integerize: {self._describe(node)} takes tensor arguments; only constant "
                                      "shape arguments are supported")
            fn = self.graph.call_function if node.op == "call_function" else self.graph.call_method
            return _replace(v, fn(node.target, args=(v.node, *rest), kwargs=dict(node.kwargs)))
        raise self._float_op(node)

    def _float_op(self, node: fx.Node) -> IntegerizeError:
        return IntegerizeError(
            f"integerize: {self._describe(node)} is a float operation on the path between quantized layers; it has "
            "no integer form here. Replace it by a quantizer (e.g. list a ReLU/ReLU6 under PACTUnsignedAct in "
            "network.quantize) or remove it, then fine-tune." + self._hint())

    def _codes(self, node: fx.Node, eps: float, lo: int, hi: int, origin: str) -> _Val:
        one = torch.tensor(1.0, dtype=torch.float64)
        return _Val(node, "codes", one * eps, one * 0.0, one * max(abs(lo), abs(hi)), origin,
                    math.ceil(math.log2(hi - lo + 1)))

    def _input_codes(self, node: fx.Node, m: nn.Module) -> _Val:
        v = self._arg(node, node.args[0])
        if v.kind != "codes":
            raise IntegerizeError(
                f"integerize: the input of {self._describe(node)} comes from {v.origin} with no quantizer in "
                "between, so it is not on an integer grid: insert a quantizer there (harmonize does it for "
                "conv/BN/linear -> conv/linear and for the average pool)." + self._hint())
        return v

    def _weights(self, node: fx.Node, m) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            wq = m.quantized_weight().detach().double().cpu()
            eps_w = m.get_eps_w().detach().double().cpu()
        c_out = wq.shape[0]
        eps_w = eps_w.reshape(-1).expand(c_out) if eps_w.numel() == 1 else eps_w.reshape(-1)
        ratio = wq / eps_w.view(-1, *([1] * (wq.dim() - 1)))
        codes = torch.round(ratio)
        if (ratio - codes).abs().max() > 1e-3:
            raise IntegerizeError(f"integerize: the weights of {self._describe(node)} are not on their grid "
                                  "(w_q / eps_w is not an integer): is this quantizer's grid zero-exact "
                                  "(symm_wts true)?")
        return codes, eps_w

    def _bias_codes(self, m, acc_scale: torch.Tensor) -> torch.Tensor | None:
        if m.bias is None:
            return None
        return torch.round(m.bias.detach().double().cpu() / acc_scale)

    def _conv(self, node, m: PACTConv2d) -> _Val:
        x = self._input_codes(node, m)
        if m.padding_mode != "zeros":
            raise IntegerizeError(f"integerize: {self._describe(node)} pads with {m.padding_mode!r}; only zero "
                                  "padding keeps the integer codes exact")
        codes, eps_w = self._weights(node, m)
        scale = x.scale * eps_w
        bias = self._bias_codes(m, scale)
        padding = m.padding if not isinstance(m.padding, str) else _same_padding(m, node)
        w_bits = math.ceil(math.log2(m.n_levels))
        layer = IntConv2d(codes, bias, m.stride, padding, m.dilation, m.groups, w_bits, x.bits)
        shape = self.shape.get(node)
        if shape is not None:
            layer.macs = int(math.prod(shape[1:]) * codes[0].numel())
        out = self._add_module(node.target, layer, (x.node,), shape)
        bound = codes.abs().flatten(1).sum(1) * x.bound + (bias.abs() if bias is not None else 0)
        _check_bound(layer, bound, node.target)
        return _Val(out, "acc", scale, torch.zeros_like(scale), bound, f"the accumulator of '{node.target}'")

    def _linear(self, node, m: PACTLinear) -> _Val:
        x = self._input_codes(node, m)
        codes, eps_w = self._weights(node, m)
        scale = x.scale * eps_w
        bias = self._bias_codes(m, scale)
        layer = IntLinear(codes, bias, math.ceil(math.log2(m.n_levels)), x.bits)
        layer.macs = int(codes.numel())
        out = self._add_module(node.target, layer, (x.node,), self.shape.get(node))
        bound = codes.abs().sum(1) * x.bound + (bias.abs() if bias is not None else 0)
        _check_bound(layer, bound, node.target)
        return _Val(out, "acc", scale, torch.zeros_like(scale), bound, f"the accumulator of '{node.target}'")

    def _batchnorm(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        if m.running_mean is None or m.running_var is None:
            raise IntegerizeError(f"integerize: {self._describe(node)} has no running statistics "
                                  "(track_running_stats=False), so it cannot be folded")
        if v.kind != "acc":
            raise IntegerizeError(f"integerize: {self._describe(node)} normalises {v.origin}, a quantized tensor; "
                                  "only a batch norm right after a conv/linear is folded into a requantization")
        gamma = (m.weight.detach().double().cpu() if m.weight is not None else torch.ones_like(m.running_var.double().cpu()))
        beta = (m.bias.detach().double().cpu() if m.bias is not None else torch.zeros_like(gamma))
        g = gamma / torch.sqrt(m.running_var.detach().double().cpu() + m.eps)
        b = beta - m.running_mean.detach().double().cpu() * g
        return _Val(v.node, "acc", v.scale * g, v.shift * g + b, v.bound, f"batch norm '{node.target}' "
                    f"(folded into the next requantization)")

    def _requant(self, v: _Val, q: QuantizerBase, where: str) -> Requant:
        if q.signed and not (q.symm or q.tqt):
            raise IntegerizeError(f"integerize: quantizer '{where}' has an asymmetric grid (lo and hi learned "
                                  "separately), whose zero is not a code: set symm true for it and fine-tune")
        if q.signed and getattr(q, "act_kind", "identity") != "identity":
            raise IntegerizeError(f"integerize: signed quantizer '{where}' applies act_kind={q.act_kind!r} in "
                                  "float before quantizing; use act_kind 'identity' (or an unsigned quantizer)")
        eps_out = float(q.get_eps().double().reshape(-1)[0])
        if q.get_eps().numel() != 1:
            raise IntegerizeError(f"integerize: quantizer '{where}' has one step per channel; activations need one")
        lo, hi, _ = tqt_code_range(q.n_levels, q.signed)
        half = 0.5 if q.rounding else 0.0
        r = v.scale / eps_out
        c = v.shift / eps_out + half
        peak = float((v.bound * r.abs()).max() + c.abs().max()) + 1.0
        fit = math.floor(EXACT_BITS - 1 - math.log2(peak))
        d = self.d if self.d is not None else max(1, min(self.d_max, fit))
        mul = torch.round(r * 2.0 ** d)
        add = torch.round(c * 2.0 ** d)
        worst = float((v.bound * mul.abs()).max() + add.abs().max())
        if worst >= 2.0 ** 62:
            raise IntegerizeError(f"integerize: requantization '{where}' overflows int64 with d={d} (worst case "
                                  f"|acc*mul|+|add| = 2^{math.log2(worst):.1f}); use a smaller d or d=None")
        if mul.abs().max() == 0:
            raise IntegerizeError(f"integerize: requantization '{where}' rounds its multiplier to 0 with d={d}; "
                                  "use a larger d or d=None")
        return Requant(mul, add, d, lo, hi, eps_out, q.signed, q.n_levels)

    def _act(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        req = self._requant(v, m, node.target)
        out = self._add_module(node.target, req, (v.node,), self.shape.get(node))
        return self._codes(out, req.eps_out, req.lo, req.hi, f"quantizer '{node.target}'")

    def _integer_add(self, node, m: PACTIntegerAdd) -> _Val:
        if node.kwargs or len(node.args) != m.num_args:
            raise IntegerizeError(f"integerize: {self._describe(node)} must get its {m.num_args} inputs positionally")
        ins = [self._arg(node, a) for a in node.args]
        eps = [float(a.get_eps().reshape(-1)[0]) for a in m.acts]
        if max(eps) - min(eps) > 1e-5 * max(eps):
            raise IntegerizeError(f"integerize: the inputs of adder '{node.target}' have different steps {eps}: "
                                  "call sync_eps() on it (the activation controller does it before every batch)")
        acts = [self._requant(v, a, f"{node.target}.acts.{i}") for i, (v, a) in enumerate(zip(ins, m.acts))]
        one = torch.tensor(1.0, dtype=torch.float64)
        total = _Val(ins[0].node, "acc", one * acts[0].eps_out, one * 0.0,
                     one * sum(max(abs(a.lo), abs(a.hi)) for a in acts), f"the integer sum of '{node.target}'")
        act_out = self._requant(total, m.act_out, f"{node.target}.act_out")
        shape = self.shape.get(node)
        for r in acts + [act_out]:
            r.out_shape = tuple(shape[1:]) if shape else ()
        out = self._add_module(node.target, IntAdd(acts, act_out), tuple(v.node for v in ins))
        return self._codes(out, act_out.eps_out, act_out.lo, act_out.hi, f"adder '{node.target}'")

    def _pool(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        if v.kind != "codes":
            raise IntegerizeError(f"integerize: {self._describe(node)} averages {v.origin}, which is not quantized")
        shape_in = self.shape.get(node.args[0])
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if tuple(s if s is not None else -1 for s in size) != (1, 1):
                raise IntegerizeError(f"integerize: {self._describe(node)}: only global adaptive pooling (output 1) "
                                      "is supported")
            window = shape_in[2] * shape_in[3]
            pool = IntSumPool()
        else:
            k = _pair(m.kernel_size)
            if _pair(m.padding) != (0, 0) or m.ceil_mode:
                raise IntegerizeError(f"integerize: {self._describe(node)}: only unpadded average pools are supported")
            window = k[0] * k[1]
            pool = IntSumPool(k, _pair(m.stride or m.kernel_size))
        out = self._add_module(node.target, pool, (v.node,), self.shape.get(node))
        return _Val(out, "acc", v.scale / window, v.shift * 0.0, v.bound * window,
                    f"average pool '{node.target}' (an integer sum)")

    def _output(self, node) -> None:
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            raise IntegerizeError("integerize: the network must return one tensor")
        v = self._arg(node, arg, "output")
        if bool((v.shift != 0).any()):
            raise IntegerizeError(f"integerize: the network output is {v.origin}, a float affine map of integers; "
                                  "end the network with a conv/linear or a quantizer")
        self.output_scale = v.scale.float()
        self.graph.output(v.node)
        return None


def _check_bound(layer: _IntLinearBase, bound: torch.Tensor, name: str) -> None:
    worst = float(bound.max())
    if worst >= 2.0 ** EXACT_BITS:
        raise IntegerizeError(f"integerize: the accumulator of '{name}' can reach 2^{math.log2(worst):.1f}, beyond "
                              "exact float64 integers; use fewer bits for its weights or inputs")
    layer.exact_float32 = worst < 2.0 ** 24
    layer.acc_bound = int(worst)


def _replace(v: _Val, node: fx.Node) -> _Val:
    return dataclasses.replace(v, node=node)


def _flatten_args(m: nn.Module) -> tuple:
    if isinstance(m, nn.Flatten):
        return (m.start_dim, m.end_dim)
    return (m.dim, m.unflattened_size)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _same_padding(m: nn.Conv2d, node) -> tuple:
    if m.padding == "valid":
        return (0, 0)
    k, dil = _pair(m.kernel_size), _pair(m.dilation)
    pads = [dd * (kk - 1) // 2 for kk, dd in zip(k, dil)]
    if any((dd * (kk - 1)) % 2 for kk, dd in zip(k, dil)):
        raise IntegerizeError(f"integerize: conv '{node.target}' uses asymmetric 'same' padding; use explicit padding")
    return tuple(pads)


# =========================================================================================== comparison
@dataclass
class Comparison:
    """Result of :func:`compare`: per-layer code agreement and prediction agreement.

    ``layers``: one row per requantization (graph order) and one for the output logits, with ``identical``
    (share of identical codes, %), ``mismatches`` and ``max_diff`` (largest code difference) measured **layer
    by layer** (the integer layer gets the fake-quant network's input codes, so a row measures that layer's own
    arithmetic), and ``e2e_identical`` / ``e2e_max_diff`` measured **end to end** (the integer network runs on
    its own codes; an early off-by-one spreads through later layers). ``predictions``: share (%) of samples whose
    argmax agree end to end. ``top1_fake`` / ``top1_int``: accuracies (%) when labels were given.
    The last row compares the logits in units of their LSB (``eps_w * eps_in``): the fake-quant logits are float32
    sums, so a 1-LSB difference there is float32 rounding, not a code error; it does not count as a code layer.
    """

    layers: list[dict]
    n: int
    predictions: float
    top1_fake: float | None = None
    top1_int: float | None = None

    COLUMNS = ("layer", "kind", "elements", "identical", "mismatches", "max_diff", "e2e_identical", "e2e_max_diff")

    @property
    def code_layers(self) -> list[dict]:
        """The rows of quantized tensors (every row but the logits)."""
        return [r for r in self.layers if r["kind"] != "logits"]

    @property
    def worst(self) -> dict:
        return min(self.code_layers, key=lambda r: (r["identical"], -r["max_diff"]))

    @property
    def min_identical(self) -> float:
        return min(r["identical"] for r in self.code_layers)

    @property
    def min_e2e_identical(self) -> float:
        return min(r["e2e_identical"] for r in self.code_layers)

    def ok(self, identical: float = 99.99) -> bool:
        """Every code layer at least ``identical`` % identical codes (layer by layer), every prediction identical
        (end to end), equal top-1."""
        return self.min_identical >= identical and self.predictions == 100.0 and \
            (self.top1_int is None or self.top1_int == self.top1_fake)

    def table(self):
        from labkit.report import Table

        return Table(self.layers, self.COLUMNS, title=f"integer vs fake-quant, {self.summary()}")

    def summary(self) -> str:
        w = self.worst
        s = (f"{self.n} samples: predictions identical {self.predictions:.2f}%; worst layer '{w['layer']}' "
             f"{w['identical']:.4f}% identical codes (max difference {w['max_diff']})")
        if self.top1_int is not None:
            s += f"; top-1 integer {self.top1_int:.2f}%, fake-quant {self.top1_fake:.2f}%"
        return s

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return str(self.table())


def _batches(batch) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(batch, torch.Tensor):
        yield batch, None
        return
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor) \
            and isinstance(batch[1], torch.Tensor) and batch[1].dim() == 1 and batch[0].dim() > 1:
        yield batch[0], batch[1]
        return
    for item in batch:
        if isinstance(item, torch.Tensor):
            yield item, None
        else:
            yield item[0], item[1]


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


class _Tally:
    def __init__(self):
        self.n = self.same = self.worst = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a - b).abs()
        self.n += diff.numel()
        self.same += int((diff == 0).sum())
        self.worst = max(self.worst, int(diff.max()) if diff.numel() else 0)

    @property
    def share(self) -> float:
        return 100.0 * self.same / max(self.n, 1)


@torch.no_grad()
def compare(qnet: nn.Module, inet: fx.GraphModule, batch) -> Comparison:
    """Run the fake-quant ``qnet`` and the integer ``inet`` on the same inputs and compare them element-wise.

    ``batch``: an input tensor, an ``(inputs, labels)`` pair, or an iterable of either (a DataLoader). Both
    networks see the same quantized input (``qnet`` gets ``eps_in * codes``). For every requantization the
    fake-quant output is turned into codes (``round(y / eps)``) and compared with the integer codes, twice:
    layer by layer (each integer requantization fed with the fake-quant input codes) and end to end (see
    :class:`Comparison`). The output row compares the logits in units of the integer output's LSB.
    Predictions (argmax) are compared end to end on every sample.
    """
    qmods = dict(qnet.named_modules())
    layers = requant_layers(inet)
    missing = [n for n, _ in layers if n not in qmods]
    if missing:
        raise IntegerizeError(f"compare: the fake-quant network has no module '{missing[0]}': was inet made from it "
                              "by integerize()?")
    local = {n: _Tally() for n, _ in layers}
    e2e = {n: _Tally() for n, _ in layers}
    out_local, out_e2e = _Tally(), _Tally()
    agree = total = correct_q = correct_i = 0
    labelled = True
    fq: dict[str, torch.Tensor] = {}
    forcing = [True]

    def q_hook(name, eps):
        def hook(_m, _inputs, output):
            fq[name] = torch.round(output.double() / eps).to(torch.int64)
        return hook

    def i_hook(name):
        def hook(_m, _inputs, output):
            if forcing[0]:
                local[name].add(fq[name], output)
                return fq[name]
            e2e[name].add(fq[name], output)
            return None
        return hook

    hooks = []
    for name, req in layers:
        hooks.append(qmods[name].register_forward_hook(q_hook(name, req.eps_out)))
        hooks.append(req.register_forward_hook(i_hook(name)))
    was = qnet.training
    qnet.eval()
    param = next(qnet.parameters())
    device, dtype = param.device, param.dtype
    try:
        for x, y in _batches(batch):
            x = x.to(device)
            codes = inet.input_quant(x)
            logits_q = qnet((codes.double() * inet.eps_in).to(dtype))
            scale = _channel_view(inet.output_scale.to(device).double(), logits_q)
            lq = torch.round(logits_q.double() / scale).to(torch.int64)
            forcing[0] = True
            out_local.add(lq, inet(x))
            forcing[0] = False
            logits_i = inet(x)
            out_e2e.add(lq, logits_i)
            pq, pi = logits_q.argmax(1), logits_i.argmax(1)
            agree += int((pq == pi).sum())
            total += len(pq)
            if y is None:
                labelled = False
            else:
                y = y.to(device)
                correct_q += int((pq == y).sum())
                correct_i += int((pi == y).sum())
    finally:
        for h in hooks:
            h.remove()
        qnet.train(was)
    rows = [_row(name, "shift" if req.shift is not None else "requant", local[name], e2e[name])
            for name, req in layers]
    rows.append(_row("output (logits, in LSB)", "logits", out_local, out_e2e))
    return Comparison(rows, total, 100.0 * agree / max(total, 1),
                      100.0 * correct_q / total if labelled and total else None,
                      100.0 * correct_i / total if labelled and total else None)


def _row(name: str, kind: str, local: _Tally, e2e: _Tally) -> dict:
    return {"layer": name, "kind": kind, "elements": local.n, "identical": local.share,
            "mismatches": local.n - local.same, "max_diff": local.worst, "e2e_identical": e2e.share,
            "e2e_max_diff": e2e.worst}


# =========================================================================================== runs
def load_quantized(path: str | Path) -> tuple[nn.Module, dict]:
    """``(qnet, cfg)`` from a run folder (its ``best.ckpt``) or a checkpoint file of a quantized run, in eval mode."""
    from labkit.checkpoint import CheckpointError, load_file
    from labkit.paths import resolve
    from labkit.train import build_network

    path = resolve(path)
    ckpt_path = path / "best.ckpt" if path.is_dir() else path
    ckpt = load_file(ckpt_path)
    if path.is_dir() and (path / "last.ckpt").is_file() and not _all_started(ckpt):
        import warnings

        warnings.warn(f"{ckpt_path} was saved (epoch {ckpt.get('epoch')}) before every quantizer had started: "
                      f"using {path / 'last.ckpt'} instead", stacklevel=2)
        ckpt_path = path / "last.ckpt"
        ckpt = load_file(ckpt_path)
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if cfg is None or "state_dict" not in ckpt:
        raise CheckpointError(f"'{ckpt_path}' is not a labkit run checkpoint (no config/state_dict): integerize needs "
                              "a checkpoint written by labkit train")
    if not cfg["network"].get("quantize"):
        raise IntegerizeError(f"'{ckpt_path}' holds a float network (no network.quantize in its config): train a "
                              "PACT/TQT run first, e.g. labkit train configs/embedded/config.pact.json")
    cfg = {**cfg, "network": {**cfg["network"], "pretrained": None}}
    qnet, _ = build_network(cfg)
    qnet.load_state_dict(ckpt["state_dict"])
    qnet.eval()
    return qnet, cfg


def _all_started(ckpt) -> bool:
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    return all(bool(v) for k, v in state.items() if k.endswith("started_flag"))


def input_shape_of(cfg: dict, batch: int = 1) -> tuple:
    """``(batch, 3, H, W)`` of the config's dataset (embedded: 32 px; ImageNet: ``data.image_size``, 224)."""
    from labkit.data import input_size

    size = input_size(cfg["data"])
    return (batch, 3, size, size)


def integerize_checkpoint(path: str | Path, *, input_bits: int = 8, d: int | None = None,
                          pow2_input: bool | None = None) -> tuple[nn.Module, fx.GraphModule, dict]:
    """``(qnet, inet, cfg)`` for a run folder or checkpoint: input grid from the config's dataset
    (``pow2_input`` defaults to true for TQT ``pow2`` networks), then :func:`integerize`."""
    qnet, cfg = load_quantized(path)
    if pow2_input is None:
        pow2_input = any(getattr(m, "pow2", False) for m in qnet.modules() if isinstance(m, QuantizerBase))
    lo, hi = input_range(cfg)
    eps_in = input_eps(lo, hi, input_bits, pow2=pow2_input)
    inet = integerize(qnet, eps_in, input_shape_of(cfg), input_bits=input_bits, d=d)
    return qnet, inet, cfg
