"""Integerization: a harmonized fake-quantized network -> a network that computes on integers only.

:func:`integerize` walks the torch.fx graph of a trained, harmonized network
(:func:`labkit.quant.recipe.pact_recipe`) and emits an integer twin with the same module names (quantization
facts §4):

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
* **shifts**: a requantization whose ``mul`` is a power of two (TQT ``pow2`` scales: adders, pool) is emitted
  as a pure shift ``(x << a) + c >> s`` with no multiplier.

``d`` is chosen per requantization (``d=None``): the largest value (at most ``d_max``) that keeps the
worst-case ``|acc * mul| + |add|`` below 2^53, so the arithmetic is exact in int64 and in float64 (the ONNX
export). Small ``d`` (the reference uses 24) rounds ``mul`` coarsely and costs identical codes:
:func:`compare` shows it.

Every tensor between the input quantizer and the output is int64; :func:`labkit.integer.compare.compare`
checks the result against the fake-quant network element by element.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from labkit.integer.modules import (
    IntAdd,
    IntConv2d,
    IntegerizeError,
    IntLinear,
    IntSumPool,
    QuantizeInput,
    Requant,
    _IntLinearBase,
)
from labkit.config.spec import D_MAX, EXACT_BITS
from labkit.integer.requant import requant_params
from labkit.quant import (
    PACTAsymmetricAct,
    PACTConv2d,
    PACTIntegerAdd,
    PACTLinear,
    PACTUnsignedAct,
    QuantizerBase,
)
from labkit.quant.functional import tqt_code_range
from labkit.quant.fxops import (
    ADD_FUNCTIONS,
    IDENTITY_MODULES,
    PASS_METHODS,
    SHAPE_FUNCTIONS,
    SHAPE_MODULES,
    QuantTracer,
)
from labkit.quant.harmonize import META_KEY

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_ACTS = (PACTUnsignedAct, PACTAsymmetricAct)


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


def integerize(qnet: nn.Module, eps_in: float, input_shape: tuple, *, input_bits: int = 8,
               d: int | None = None,
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
        harmonized = isinstance(self.qnet, fx.GraphModule) and META_KEY in getattr(self.qnet, "meta", {})
        if isinstance(self.qnet, fx.GraphModule):
            return self.qnet, harmonized
        try:
            graph = QuantTracer().trace(self.qnet)
        except Exception as err:  # noqa: BLE001
            raise IntegerizeError(f"integerize: torch.fx cannot trace {type(self.qnet).__name__} ({err}); "
                                  "build the network with labkit.quant.recipe.pact_recipe (it harmonizes and "
                                  "traces)") from err
        return fx.GraphModule(self.qnet, graph), harmonized

    def _hint(self) -> str:
        if self.harmonized:
            return ""
        return (" This network was not harmonized: run labkit.quant.harmonize.harmonize(net) after the "
                "recipe (or pact_recipe with network.quantize.harmonize enabled) and train/fine-tune it that "
                "way.")

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
                    f"integerize: quantizer '{name}' ({type(m).__name__}) has not started, it still runs in "
                    "float: integerize a network after quantization-aware training (load its checkpoint), or "
                    "call start() on its quantizers (the training controllers do it by their schedule)")

    def _shapes(self, gm: fx.GraphModule) -> None:
        param = next(gm.parameters(), None)
        x = torch.zeros(self.input_shape, dtype=param.dtype if param is not None else None,
                        device=param.device if param is not None else None)
        was = gm.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        gm.train(was)
        self.shape = {n: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                      if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}

    # ------------------------------------------------------------------ node visitors
    def _add_module(self, name: str, module: nn.Module, args: tuple, shape: tuple | None = None) -> fx.Node:
        self.modules[name] = module
        if shape is not None and hasattr(module, "out_shape"):
            module.out_shape = tuple(shape[1:])
        return self.graph.call_module(name, args=args)

    def _arg(self, node: fx.Node, arg: Any, what: str = "input") -> _Val:
        if not isinstance(arg, fx.Node) or arg not in self.env or not isinstance(self.env[arg], _Val):
            raise IntegerizeError(f"integerize: {self._describe(node)}: its {what} {arg!r} is not a tensor "
                                  "of the network; only tensor-to-tensor layers can be integerized")
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
            raise IntegerizeError(f"integerize: {self._describe(node)} reads a float tensor attribute inside "
                                  "the graph; fold it into a layer")
        if node.op == "call_module":
            return self._module(node, self.qmods[node.target])
        if node.op == "call_function" and node.target in ADD_FUNCTIONS:
            raise IntegerizeError(
                f"integerize: {self._describe(node)} in '{node.meta.get('labkit_scope') or 'the root'}' adds "
                "two tensors in float: harmonize the network so the add becomes a PACTIntegerAdd (inputs on "
                "one common eps)." + (self._hint() or " Was a quantizer removed after harmonization?"))
        if (node.op == "call_function" and node.target in SHAPE_FUNCTIONS) or \
                (node.op == "call_method" and node.target in PASS_METHODS):
            v = self._arg(node, node.args[0])
            rest = tuple(a for a in node.args[1:])
            if any(isinstance(a, fx.Node) for a in rest) or any(
                isinstance(a, fx.Node) for a in node.kwargs.values()
            ):
                raise IntegerizeError(f"integerize: {self._describe(node)} takes tensor arguments; only "
                                      "constant shape arguments are supported")
            fn = self.graph.call_function if node.op == "call_function" else self.graph.call_method
            return _replace(v, fn(node.target, args=(v.node, *rest), kwargs=dict(node.kwargs)))
        raise self._float_op(node)

    def _module(self, node: fx.Node, m: nn.Module):
        if isinstance(m, (PACTConv2d, PACTLinear)):
            return self._linear_op(node, m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(node, m)
        if isinstance(m, _ACTS):
            return self._act(node, m)
        if isinstance(m, PACTIntegerAdd):
            return self._integer_add(node, m)
        if isinstance(m, _POOLS):
            return self._pool(node, m)
        if isinstance(m, IDENTITY_MODULES):
            return self._arg(node, node.args[0])
        if isinstance(m, SHAPE_MODULES):
            v = self._arg(node, node.args[0])
            new = self._add_module(node.target, type(m)(*_flatten_args(m)), (v.node,))
            return _replace(v, new)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            raise IntegerizeError(
                f"integerize: {self._describe(node)} is not quantized: add it to network.quantize "
                f"({'PACTConv2d' if isinstance(m, nn.Conv2d) else 'PACTLinear'}) and fine-tune")
        raise self._float_op(node)

    def _float_op(self, node: fx.Node) -> IntegerizeError:
        return IntegerizeError(
            f"integerize: {self._describe(node)} is a float operation on the path between quantized layers; "
            "it has no integer form here. Replace it by a quantizer (e.g. list a ReLU/ReLU6 under "
            "PACTUnsignedAct in network.quantize) or remove it, then fine-tune." + self._hint())

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

    def _linear_op(self, node, m: PACTConv2d | PACTLinear) -> _Val:
        """Conv or linear on codes: integer weights and bias, an exact accumulator (bound checked)."""
        x = self._input_codes(node, m)
        codes, eps_w = self._weights(node, m)
        scale = x.scale * eps_w
        bias = self._bias_codes(m, scale)
        if isinstance(m, PACTConv2d):
            if m.padding_mode != "zeros":
                raise IntegerizeError(f"integerize: {self._describe(node)} pads with {m.padding_mode!r}; "
                                      "only zero padding keeps the integer codes exact")
            padding = m.padding if not isinstance(m.padding, str) else _same_padding(m, node)
            layer = IntConv2d(codes, bias, m.stride, padding, m.dilation, m.groups, m.bits, x.bits)
        else:
            layer = IntLinear(codes, bias, m.bits, x.bits)
        shape = self.shape.get(node)
        if shape is not None:
            layer.macs = int(math.prod(shape[1:]) * codes[0].numel())
        out = self._add_module(node.target, layer, (x.node,), shape)
        bound = codes.abs().flatten(1).sum(1) * x.bound + (bias.abs() if bias is not None else 0)
        _check_bound(layer, bound, node.target)
        return _Val(out, "acc", scale, torch.zeros_like(scale), bound, f"the accumulator of '{node.target}'")

    def _batchnorm(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        if m.running_mean is None or m.running_var is None:
            raise IntegerizeError(f"integerize: {self._describe(node)} has no running statistics "
                                  "(track_running_stats=False), so it cannot be folded")
        if v.kind != "acc":
            raise IntegerizeError(f"integerize: {self._describe(node)} normalises {v.origin}, a quantized "
                                  "tensor; only a batch norm right after a conv/linear is folded into a "
                                  "requantization")
        gamma = (
            m.weight.detach().double().cpu()
            if m.weight is not None
            else torch.ones_like(m.running_var.double().cpu())
        )
        beta = (m.bias.detach().double().cpu() if m.bias is not None else torch.zeros_like(gamma))
        g = gamma / torch.sqrt(m.running_var.detach().double().cpu() + m.eps)
        b = beta - m.running_mean.detach().double().cpu() * g
        return _Val(v.node, "acc", v.scale * g, v.shift * g + b, v.bound, f"batch norm '{node.target}' "
                    f"(folded into the next requantization)")

    def _requant(self, v: _Val, q: QuantizerBase, where: str) -> Requant:
        if q.signed and not (q.symm or q.tqt):
            raise IntegerizeError(f"integerize: quantizer '{where}' has an asymmetric grid (lo and hi "
                                  "learned separately), whose zero is not a code: set symm true for it and "
                                  "fine-tune")
        if q.signed and getattr(q, "act_kind", "identity") != "identity":
            raise IntegerizeError(f"integerize: signed quantizer '{where}' applies act_kind={q.act_kind!r} "
                                  "in float before quantizing; use act_kind 'identity' (or an unsigned "
                                  "quantizer)")
        eps_out = float(q.get_eps().double().reshape(-1)[0])
        if q.get_eps().numel() != 1:
            raise IntegerizeError(f"integerize: quantizer '{where}' has one step per channel; activations "
                                  "need one")
        lo, hi, _ = tqt_code_range(q.n_levels, q.signed)
        half = 0.5 if q.rounding else 0.0
        mul, add, d = requant_params(v.scale / eps_out, v.shift / eps_out + half, v.bound, self.d, self.d_max,
                                     where)
        return Requant(mul, add, d, lo, hi, eps_out, q.signed, q.n_levels)

    def _act(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        req = self._requant(v, m, node.target)
        out = self._add_module(node.target, req, (v.node,), self.shape.get(node))
        return self._codes(out, req.eps_out, req.lo, req.hi, f"quantizer '{node.target}'")

    def _integer_add(self, node, m: PACTIntegerAdd) -> _Val:
        if node.kwargs or len(node.args) != m.num_args:
            raise IntegerizeError(f"integerize: {self._describe(node)} must get its {m.num_args} inputs "
                                  "positionally")
        ins = [self._arg(node, a) for a in node.args]
        eps = [float(a.get_eps().reshape(-1)[0]) for a in m.acts]
        if max(eps) - min(eps) > 1e-5 * max(eps):
            raise IntegerizeError(f"integerize: the inputs of adder '{node.target}' have different steps "
                                  f"{eps}: call sync_eps() on it (the activation controller does it before "
                                  "every batch)")
        acts = [self._requant(v, a, f"{node.target}.acts.{i}") for i, (v, a) in enumerate(zip(ins, m.acts))]
        one = torch.tensor(1.0, dtype=torch.float64)
        total = _Val(ins[0].node, "acc", one * acts[0].eps_out, one * 0.0,
                     one * sum(max(abs(a.lo), abs(a.hi)) for a in acts),
                     f"the integer sum of '{node.target}'")
        act_out = self._requant(total, m.act_out, f"{node.target}.act_out")
        shape = self.shape.get(node)
        for r in acts + [act_out]:
            r.out_shape = tuple(shape[1:]) if shape else ()
        out = self._add_module(node.target, IntAdd(acts, act_out), tuple(v.node for v in ins))
        return self._codes(out, act_out.eps_out, act_out.lo, act_out.hi, f"adder '{node.target}'")

    def _pool(self, node, m) -> _Val:
        v = self._arg(node, node.args[0])
        if v.kind != "codes":
            raise IntegerizeError(f"integerize: {self._describe(node)} averages {v.origin}, which is not "
                                  "quantized")
        shape_in = self.shape.get(node.args[0])
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if tuple(s if s is not None else -1 for s in size) != (1, 1):
                raise IntegerizeError(f"integerize: {self._describe(node)}: only global adaptive pooling "
                                      "(output 1) is supported")
            window = shape_in[2] * shape_in[3]
            pool = IntSumPool()
        else:
            k = _pair(m.kernel_size)
            if _pair(m.padding) != (0, 0) or m.ceil_mode:
                raise IntegerizeError(f"integerize: {self._describe(node)}: only unpadded average pools are "
                                      "supported")
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
            raise IntegerizeError(f"integerize: the network output is {v.origin}, a float affine map of "
                                  "integers; end the network with a conv/linear or a quantizer")
        self.output_scale = v.scale.float()
        self.graph.output(v.node)
        return None


def _check_bound(layer: _IntLinearBase, bound: torch.Tensor, name: str) -> None:
    worst = float(bound.max())
    if worst >= 2.0 ** EXACT_BITS:
        raise IntegerizeError(f"integerize: the accumulator of '{name}' can reach 2^{math.log2(worst):.1f}, "
                              "beyond exact float64 integers; use fewer bits for its weights or inputs")
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
        raise IntegerizeError(f"integerize: conv '{node.target}' uses asymmetric 'same' padding; use "
                              "explicit padding")
    return tuple(pads)
