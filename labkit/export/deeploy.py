"""The Deeploy export: the int32 integer twin (:func:`labkit.integer.int32_twin`) as Deeploy's Generic
platform (``deeploy-pulp`` 0.2.1) parses, maps and compiles it, with the same numbers.

What Deeploy requires (docs/export.md gives the source lines): a static batch; a shape (``value_info``) for
every tensor; no Cast or Identity; each requantization one ``RequantShift(x, mul, add)`` node (domain
``labkit``) with ``div = 2^d``, ``n_levels_out`` and ``signed`` as float32 *tensor* attributes and int32
``mul``/``add``, whose kernel computes, all in int32,

    y = clip(((x * mul + add) + 2^(d-1)) >> d)   over the full range of n_levels_out (signed, or 0..n-1)

so ``add`` is written **without** labkit's rounding half-step (``add - 2^(d-1)``; the kernel adds it), and
each node carries :data:`KEEP_ADD`, so that Deeploy's Generic flow uses that ``add`` as written; the global
average pool as a depthwise Conv of ones (Deeploy maps no GlobalAveragePool, and its ReduceSum is wrong for
4-d sums); Gemm with explicit ``alpha``/``beta``; convs without bias. :func:`as_standard` rewrites each
RequantShift into standard operators with exactly these semantics, so onnxruntime can check the whole graph.
The ``deeploy-cmsis`` target writes the CMSIS twin (:mod:`labkit.integer.cmsis_requant`) with the same nodes,
then :func:`labkit.export.cmsis_graph.for_cmsis` rewrites the graph for Deeploy's CMSIS mapping.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from labkit.export.cmsis_graph import for_onnxruntime
from labkit.export.graph import CUSTOM_DOMAIN, ExportError, GraphWriter, Value, weight_codes
from labkit.integer import INT32_MAX, Int32Requant, IntConv2d, IntLinear, Requant, requant_layers
from labkit.integer.cmsis_requant import CmsisRequant
from labkit.integer.int32 import PreClip

DEEPLOY_OPSET = 13


def _half(d: int) -> int:
    return 1 << (d - 1) if d > 0 else 0


def _full_range(n_levels: int, signed: bool) -> tuple[int, int]:
    return (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)


#: RequantShift attribute that Deeploy's EmulateCMSISRequantPass (v0.2.1, ``DebugPasses.py:35``) takes as
#: "already in CMSIS form" and skips: without it the Generic flow rounds each ``add`` to a multiple of ``mul``
#: (the bias before the multiply, as CMSIS-NN computes) and no longer computes the twin's ``floor((x mul +
#: add) / 2^d)``
KEEP_ADD = "Emulate_CMSIS_RequantShift"


def _tensor_attr(value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32))


class DeeployWriter(GraphWriter):
    """The Deeploy form (module docstring); ``batch``: the static batch. ``target`` ``deeploy-cmsis``: the
    network of :func:`labkit.integer.cmsis_requant.cmsis_twin`, whose requantizations of a conv/pool output
    are :class:`CmsisRequant` (one RequantShift each, ``add = k mul``, int64 where it leaves int32;
    Deeploy's CMSIS lowering merges it with the layer), the others one-shift int32 ones without pre-clip."""

    def __init__(self, inet, batch: int | None, target: str = "deeploy"):
        super().__init__(inet, batch)
        self.target = target
        self._accumulators: set[str] = set()  # conv/pool outputs (cmsis: merged with their requant)
        self._gemms: set[str] = set()  # linear outputs
        # a grouped requantization: its parts, how to sum
        self._groups: dict[str, tuple[list[str], tuple]] = {}
        self._summed: dict[str, str] = {}
        self._steps: dict[tuple, str] = {}

    def requant(self, value: Value, req: Requant, base: str, shape: tuple) -> Value:
        full = _full_range(req.n_levels, req.signed)
        if (req.lo, req.hi) != full:
            raise ExportError(f"export --target {self.target}: requantization '{base}' clips to "
                              f"{req.lo}..{req.hi}, but Deeploy's RequantShift clips to the full range "
                              f"{full[0]}..{full[1]} of its {req.n_levels} levels")
        x = self.resolve(value)[0]
        self.check_form(x, req, base)
        groups = req.groups if isinstance(req, Int32Requant) else [(req.d, [])]
        if isinstance(req, Int32Requant) and req.clip is not None:
            x = self.preclip(x, req.clip, base, shape)
        mul, add = req.mul.cpu().numpy(), req.add.cpu().numpy()
        if len(groups) == 1:
            return self.requant_shift(x, mul, add, req.d, req.n_levels, req.signed, base, shape), "f"
        parts = []
        for i, (d, members) in enumerate(groups):  # the other channels: mul = add = 0, output code 0
            keep = np.zeros(mul.shape, dtype=bool)
            keep[members] = True
            parts.append(self.requant_shift(x, np.where(keep, mul, 0), np.where(keep, add, 0), d,
                                            req.n_levels,
                                            req.signed, f"{base}.group{i}", shape))
        key = f"{base}:groups"
        self._groups[key] = (parts, (req.n_levels, req.signed, base, shape))
        return key, "f"

    def resolve(self, value: Value) -> Value:
        """A grouped requantization's output as one int8 tensor: its parts (each group's codes, 0 elsewhere)
        added, then a unit RequantShift back to int8; emitted once, where first needed."""
        if value[0] not in self._groups:
            return value
        if value[0] not in self._summed:
            parts, (n_levels, signed, base, shape) = self._groups[value[0]]
            total = self.sum(parts, base, shape)
            self._summed[value[0]] = self.requant_shift(total, np.int32(1), np.int32(0), 0, n_levels, signed,
                                                        f"{base}.sum", shape)
        return self._summed[value[0]], "f"

    def sum(self, names: list[str], base: str, shape: tuple) -> str:
        total = names[0]
        for name in names[1:]:
            total = self.node("Add", [total, name], base, shape)
        return total

    def requant_shift(self, x: str, mul, add, d: int, n_levels: int, signed: bool, base: str,
                      shape: tuple) -> str:
        """One RequantShift node: ``clip(floor((x mul + add) / 2^d))`` (``add`` with the half step, which the
        kernel adds itself: written as ``add - 2^(d-1)``)."""
        view = (-1,) + (1,) * (len(shape) - 2)
        mul = np.asarray(mul).astype(np.int32)
        add = np.asarray(add, dtype=np.int64) - _half(d)  # int64 only where a CMSIS k mul leaves int32
        add = add.astype(np.int32 if np.abs(add).max(initial=0) <= INT32_MAX else np.int64)
        if mul.ndim:
            mul = mul.reshape(view)
        if add.ndim:
            add = add.reshape(view)
        return self.node("RequantShift", [x, self.const(f"{base}_mul", mul), self.const(f"{base}_add", add)],
                         base, shape, domain=CUSTOM_DOMAIN, div=_tensor_attr(2.0 ** d),
                         n_levels_out=_tensor_attr([n_levels]), signed=_tensor_attr([int(signed)]),
                         **{KEEP_ADD: _tensor_attr([1])})

    def step(self, value: int, shape: tuple) -> str:
        """The Mul constant ``value`` of a pre-clip, one per value and tensor shape: Deeploy's Generic Mul
        does not broadcast, so Deeploy stores it at the size of the tensor (shared by the Mul nodes of that
        shape)."""
        key = (value, tuple(shape))
        if key not in self._steps:
            self._steps[key] = self.const(f"preclip_step_{'m' if value < 0 else ''}{abs(value)}",
                                          np.array([value], dtype=np.float32))
        return self._steps[key]

    def preclip(self, x: str, clip: PreClip, base: str, shape: tuple) -> str:
        """The pre-clip (:class:`labkit.integer.int32.PreClip`) as Deeploy nodes: per side a RequantShift
        ``e = clip(floor((+-x + c) / 2^k), 0, 255)`` (mul +-1, 256 unsigned levels), a Mul ``e * -+2^k`` and
        an Add; both sides read the unclipped ``x`` (they never act on the same value)."""
        out, step = x, 1 << clip.k
        for side, edge, sign in (("hi", clip.top, 1), ("lo", clip.bot, -1)):
            if edge is None:
                continue
            edge = edge.cpu().numpy().astype(np.int64)  # e = floor((x - top) / 2^k) or floor((bot - x) / 2^k)
            e = self.requant_shift(x, np.full(edge.shape, sign), -sign * edge, clip.k, 256, False,
                                   f"{base}.preclip_{side}", shape)
            scaled = self.node("Mul", [e, self.step(-sign * step, shape)], f"{base}.preclip_{side}", shape)
            out = self.node("Add", [out, scaled], f"{base}.preclip_{side}", shape)
        return out

    def accumulator(self, name: str) -> str:
        self._accumulators.add(name)
        return name

    def check_form(self, x: str, req: Requant, base: str) -> None:
        """A ``deeploy-cmsis`` requantization must be what the CMSIS platform runs: the CMSIS form after a
        conv/linear/pool (merged with it), one int32 RequantShift elsewhere (Deeploy's Generic kernel); a
        ``deeploy`` one is never the CMSIS form (its 64-bit product overflows the Generic int32 kernel)."""
        if self.target == "deeploy" and isinstance(req, CmsisRequant):
            raise ExportError(f"export --target deeploy: requantization '{base}' is in the CMSIS form (bias "
                              "before the multiply, 64-bit product), which Deeploy's Generic kernel cannot "
                              "compute in int32: export labkit.integer.int32_twin(inet)[0], or use --target "
                              "deeploy-cmsis")
        if self.target != "deeploy-cmsis":
            return
        if x in self._gemms:
            raise ExportError(f"export --target deeploy-cmsis: requantization '{base}' follows a linear "
                              "layer, which the CMSIS graph writes as MatMul + Add (no requantized Gemm is "
                              "exported): only a last linear layer (the logits) is supported")
        merged = x in self._accumulators
        if merged != isinstance(req, CmsisRequant) or (not merged and (len(req.groups) > 1 or req.clip
                                                                       is not None)):
            form = "merged with its layer" if merged else "one int32 RequantShift"
            raise ExportError(f"export --target deeploy-cmsis: requantization '{base}' is not in the form "
                              f"Deeploy's CMSIS platform computes ({form}): export "
                              "labkit.integer.cmsis_requant.cmsis_twin(inet)[0]")

    def conv(self, value: Value, m: IntConv2d, base: str, shape: tuple) -> Value:
        if m.bias is not None:
            raise ExportError(f"export --target {self.target}: conv '{base}' has a bias, which Deeploy's "
                              "integer Conv does not take; fold it into the following batch norm "
                              "(bias=False) and fine-tune")
        if m.acc_bound > INT32_MAX:
            raise ExportError(f"export --target {self.target}: the accumulator of conv '{base}' can reach "
                              f"{m.acc_bound} >= 2^31, beyond Deeploy's int32 accumulator; quantize its "
                              "weights or inputs to fewer bits")
        pad = tuple(m.padding)
        return self.accumulator(self.node(
            "Conv", [self.resolve(value)[0], self.const(f"{base}_weight", weight_codes(m)[0])], base, shape,
            kernel_shape=list(m.weight.shape[2:]), strides=list(m.stride),
            pads=[pad[0], pad[1], pad[0], pad[1]], dilations=list(m.dilation), group=int(m.groups))), "f"

    def linear(self, value: Value, m: IntLinear, base: str, shape: tuple) -> Value:
        if m.acc_bound > INT32_MAX:
            raise ExportError(f"export --target {self.target}: the accumulator of '{base}' can reach "
                              f"{m.acc_bound} >= 2^31, beyond Deeploy's int32 Gemm; quantize its weights or "
                              "inputs to fewer bits")
        bias = m.bias.cpu().numpy() if m.bias is not None else np.zeros(m.weight.shape[0], dtype=np.int64)
        inputs = [self.resolve(value)[0], self.const(f"{base}_weight", weight_codes(m)[0]),
                  self.const(f"{base}_bias",
                             bias.astype(np.float32 if np.abs(bias).max() < 2 ** 24 else np.int32))]
        gemm = self.node("Gemm", inputs, base, shape, alpha=1.0, beta=1.0, transA=0, transB=1)
        self._gemms.add(gemm)
        return gemm, "f"

    def pool(self, value: Value, base: str, in_shape: tuple, shape: tuple) -> Value:
        _, c, h, w = in_shape
        ones = self.const(f"{base}_ones", np.ones((c, 1, h, w), dtype=np.float32))
        return self.accumulator(self.node("Conv", [self.resolve(value)[0], ones], base, shape,
                                          kernel_shape=[h, w], strides=[1, 1], pads=[0, 0, 0, 0],
                                          dilations=[1, 1], group=int(c))), "f"

    def add(self, parts: list[Value], base: str, shape: tuple, lo: int, hi: int) -> Value:
        names = []  # a grouped input joins the sum with its parts
        for name, _ in parts:
            names += self._groups[name][0] if name in self._groups and name not in self._summed else [name]
        return self.sum(names, base, shape), "f"

    def flatten(self, value: Value, base: str, shape: tuple) -> Value:
        return super().flatten(self.resolve(value), base, shape)

    def build(self) -> onnx.ModelProto:
        not_int32 = [n for n, r in requant_layers(self.inet) if not isinstance(r, Int32Requant)]
        twin = "labkit.integer.cmsis_requant.cmsis_twin" if self.target == "deeploy-cmsis" else \
            "labkit.integer.int32_twin"
        if not_int32:
            raise ExportError(f"export --target {self.target}: requantization '{not_int32[0]}' is not int32 "
                              f"(Deeploy computes in int32): export {twin}(inet)[0]")
        (out, _), out_shape = self.walk()
        if self.nodes[-1].output[0] != out:
            raise ExportError(
                f"export --target {self.target}: the output layer must be the network's last operation"
            )
        self.nodes[-1].output[0] = "output"  # the last layer writes the graph output (no Identity/Cast)
        self.shapes["output"] = self.shapes.pop(out)
        value_info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k,
                      v in self.shapes.items()
                      if k not in ("input", "output")]
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shapes["input"]))
        outp = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))
        return self.model(self.nodes, [inp], [outp], [("", DEEPLOY_OPSET), (CUSTOM_DOMAIN, 1)],
                          {"requant": "RequantShift (int32, Deeploy)", "target": self.target}, value_info)


def _in_float64(n: onnx.NodeProto, inits: dict) -> list[onnx.NodeProto]:
    """Node ``n`` computed in float64 (its constants converted, its other inputs cast; its output float64)."""
    nodes, ins = [], []
    for i, name in enumerate(n.input):
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float64),
                                                         name))
            ins.append(name)
        else:
            nodes.append(helper.make_node("Cast", [name], [f"{n.name}_in{i}"], to=TensorProto.DOUBLE))
            ins.append(f"{n.name}_in{i}")
    return nodes + [helper.make_node(n.op_type, ins, list(n.output), name=n.name)]


def _gemm64(n: onnx.NodeProto, inits: dict, outputs: dict) -> list[onnx.NodeProto]:
    """A Gemm in float64; the logits stay float64 (exact beyond 2^24), another output is cast back."""
    for name in n.input[1:]:
        wide = numpy_helper.to_array(inits[name]).astype(np.float64)
        inits[name].CopyFrom(numpy_helper.from_array(wide, name))
    nodes = [helper.make_node("Cast", [n.input[0]], [f"{n.name}_in64"], to=TensorProto.DOUBLE)]
    gemm = helper.make_node("Gemm", [f"{n.name}_in64", *n.input[1:]], list(n.output), name=n.name)
    gemm.attribute.extend(n.attribute)
    nodes.append(gemm)
    if n.output[0] in outputs:
        outputs[n.output[0]].type.tensor_type.elem_type = TensorProto.DOUBLE
    else:
        gemm.output[0] = f"{n.name}_out64"
        nodes.append(helper.make_node("Cast", [f"{n.name}_out64"], list(n.output), to=TensorProto.FLOAT))
    return nodes


def _requant_standard(n: onnx.NodeProto, inits: dict, const) -> list[onnx.NodeProto]:
    """A RequantShift as ``Cast, Mul, Add (add + 2^(d-1)), Div, Floor, Clip, Cast`` in float64."""
    attrs = {a.name: numpy_helper.to_array(a.t).reshape(-1)[0] for a in n.attribute}
    d, levels, signed = int(np.log2(attrs["div"])), int(attrs["n_levels_out"]), bool(attrs["signed"])
    lo, hi = (-(levels // 2), levels // 2 - 1) if signed else (0, levels - 1)
    mul, add = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in n.input[1:])
    p = n.name
    return [helper.make_node("Cast", [n.input[0]], [f"{p}_x"], to=TensorProto.DOUBLE),
            helper.make_node("Mul", [f"{p}_x", const(f"{p}_mul64", mul)], [f"{p}_m"]),
            helper.make_node("Add", [f"{p}_m", const(f"{p}_add64", add + _half(d))], [f"{p}_a"]),
            helper.make_node("Div", [f"{p}_a", const(f"{p}_div64", 2.0 ** d)], [f"{p}_q"]),
            helper.make_node("Floor", [f"{p}_q"], [f"{p}_f"]),
            helper.make_node("Clip", [f"{p}_f", const(f"{p}_lo", lo), const(f"{p}_hi", hi)], [f"{p}_c"]),
            helper.make_node("Cast", [f"{p}_c"], list(n.output), to=TensorProto.FLOAT)]


def as_standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a Deeploy export whose RequantShift nodes are standard operators with Deeploy's semantics
    (module docstring; float64, exact) and whose Gemm (or MatMul + Add) and pre-clip Mul/Add run in float64,
    so onnxruntime can run it; a ``deeploy-cmsis`` graph first in NCHW
    (:func:`labkit.export.cmsis_graph.for_onnxruntime`)."""
    model = for_onnxruntime(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name: o for o in g.output}
    nodes, extra, wide = [], [], set()

    def const(name, value):
        extra.append(numpy_helper.from_array(np.asarray(value, dtype=np.float64), name))
        return name

    for n in g.node:
        if n.op_type == "Gemm":
            nodes += _gemm64(n, inits, outputs)
            continue
        if n.op_type in ("Mul", "Add") and "_preclip_" in n.name:  # accumulator arithmetic: float64
            nodes += _in_float64(n, inits)
            continue
        if n.op_type == "MatMul" or (n.op_type == "Add" and any(i in wide for i in n.input)):
            nodes += _in_float64(n, inits)  # a Gemm for the CMSIS platform: the logits in float64
            wide.add(n.output[0])
            if n.output[0] in outputs:
                outputs[n.output[0]].type.tensor_type.elem_type = TensorProto.DOUBLE
            continue
        nodes += _requant_standard(n, inits, const) if n.op_type == "RequantShift" else [n]
    used = {name for n in nodes for name in n.input}
    kept = [i for i in g.initializer if i.name in used] + extra
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(kept)
    del g.value_info[:]
    opsets = [op for op in model.opset_import if op.domain != CUSTOM_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model
