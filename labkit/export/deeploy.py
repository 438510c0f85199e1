"""The Deeploy export: the int32 integer twin (:func:`labkit.integer.int32_twin`) as Deeploy's Generic platform
(``deeploy-pulp`` 0.2.1) parses, maps and compiles it, with the same numbers.

What Deeploy requires (docs/export.md gives the source lines): a static batch; a shape (``value_info``) for every
tensor; no Cast or Identity; each requantization one ``RequantShift(x, mul, add)`` node (domain ``labkit``) with
``div = 2^d``, ``n_levels_out`` and ``signed`` as float32 *tensor* attributes and int32 ``mul``/``add``, whose
kernel computes, all in int32,

    y = clip(((x * mul + add) + 2^(d-1)) >> d)   over the full range of n_levels_out (signed, or 0..n-1)

so ``add`` is written **without** labkit's rounding half-step (``add - 2^(d-1)``; the kernel adds it); the global
average pool as a depthwise Conv of ones (Deeploy maps no GlobalAveragePool, and its ReduceSum is wrong for
4-d sums); Gemm with explicit ``alpha``/``beta``; convs without bias. :func:`as_standard` rewrites each RequantShift
into standard operators with exactly these semantics, so onnxruntime can check the whole graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from labkit.export.graph import CUSTOM_DOMAIN, ExportError, GraphWriter, Value, weight_codes
from labkit.integer import INT32_MAX, Int32Requant, IntConv2d, IntLinear, Requant, requant_layers

DEEPLOY_OPSET = 13


def _half(d: int) -> int:
    return 1 << (d - 1) if d > 0 else 0


def _tensor_attr(value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32))


class DeeployWriter(GraphWriter):
    """The Deeploy form (module docstring); ``batch``: the static batch."""

    def requant(self, value: Value, req: Requant, base: str, shape: tuple) -> Value:
        full = (-(req.n_levels // 2), req.n_levels // 2 - 1) if req.signed else (0, req.n_levels - 1)
        if (req.lo, req.hi) != full:
            raise ExportError(f"export --target deeploy: requantization '{base}' clips to {req.lo}..{req.hi}, but "
                              f"Deeploy's RequantShift clips to the full range {full[0]}..{full[1]} of its "
                              f"{req.n_levels} levels")
        view = (-1,) + (1,) * (len(shape) - 2)
        mul = req.mul.cpu().numpy().astype(np.int32)
        add = (req.add.cpu().numpy() - _half(req.d)).astype(np.int32)
        if mul.ndim:
            mul = mul.reshape(view)
        if add.ndim:
            add = add.reshape(view)
        out = self.node("RequantShift", [value[0], self.const(f"{base}_mul", mul), self.const(f"{base}_add", add)],
                        base, shape, domain=CUSTOM_DOMAIN, div=_tensor_attr(2.0 ** req.d),
                        n_levels_out=_tensor_attr([req.n_levels]), signed=_tensor_attr([int(req.signed)]))
        return out, "f"

    def conv(self, value: Value, m: IntConv2d, base: str, shape: tuple) -> Value:
        if m.bias is not None:
            raise ExportError(f"export --target deeploy: conv '{base}' has a bias, which Deeploy's integer Conv "
                              "does not take; fold it into the following batch norm (bias=False) and fine-tune")
        if m.acc_bound > INT32_MAX:
            raise ExportError(f"export --target deeploy: the accumulator of conv '{base}' can reach {m.acc_bound} "
                              ">= 2^31, beyond Deeploy's int32 accumulator; quantize its weights or inputs to fewer bits")
        pad = tuple(m.padding)
        return self.node("Conv", [value[0], self.const(f"{base}_weight", weight_codes(m)[0])], base, shape,
                         kernel_shape=list(m.weight.shape[2:]), strides=list(m.stride),
                         pads=[pad[0], pad[1], pad[0], pad[1]], dilations=list(m.dilation), group=int(m.groups)), "f"

    def linear(self, value: Value, m: IntLinear, base: str, shape: tuple) -> Value:
        if m.acc_bound > INT32_MAX:
            raise ExportError(f"export --target deeploy: the accumulator of '{base}' can reach {m.acc_bound} >= 2^31, "
                              "beyond Deeploy's int32 Gemm; quantize its weights or inputs to fewer bits")
        bias = m.bias.cpu().numpy() if m.bias is not None else np.zeros(m.weight.shape[0], dtype=np.int64)
        inputs = [value[0], self.const(f"{base}_weight", weight_codes(m)[0]),
                  self.const(f"{base}_bias", bias.astype(np.float32 if np.abs(bias).max() < 2 ** 24 else np.int32))]
        return self.node("Gemm", inputs, base, shape, alpha=1.0, beta=1.0, transA=0, transB=1), "f"

    def pool(self, value: Value, base: str, in_shape: tuple, shape: tuple) -> Value:
        _, c, h, w = in_shape
        ones = self.const(f"{base}_ones", np.ones((c, 1, h, w), dtype=np.float32))
        return self.node("Conv", [value[0], ones], base, shape, kernel_shape=[h, w], strides=[1, 1],
                         pads=[0, 0, 0, 0], dilations=[1, 1], group=int(c)), "f"

    def add(self, parts: list[Value], base: str, shape: tuple, lo: int, hi: int) -> Value:
        total = parts[0]
        for p in parts[1:]:
            total = (self.node("Add", [total[0], p[0]], base, shape), "f")
        return total

    def build(self) -> onnx.ModelProto:
        not_int32 = [n for n, r in requant_layers(self.inet) if not isinstance(r, Int32Requant)]
        if not_int32:
            raise ExportError(f"export --target deeploy: requantization '{not_int32[0]}' is not int32 (Deeploy "
                              "computes in int32): export labkit.integer.int32_twin(inet)[0]")
        (out, _), out_shape = self.walk()
        if self.nodes[-1].output[0] != out:
            raise ExportError("export --target deeploy: the output layer must be the network's last operation")
        self.nodes[-1].output[0] = "output"  # the last layer writes the graph output (no Identity/Cast)
        self.shapes["output"] = self.shapes.pop(out)
        value_info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in self.shapes.items()
                      if k not in ("input", "output")]
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shapes["input"]))
        outp = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))
        return self.model(self.nodes, [inp], [outp], [("", DEEPLOY_OPSET), (CUSTOM_DOMAIN, 1)],
                          {"requant": "RequantShift (int32, Deeploy)", "target": "deeploy"}, value_info)


def as_standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a Deeploy export whose RequantShift nodes are standard operators with Deeploy's semantics
    (module docstring; float64, exact) and whose Gemm runs in float64, so onnxruntime can run it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name: o for o in g.output}
    nodes, extra = [], []

    def const(name, value):
        extra.append(numpy_helper.from_array(np.asarray(value, dtype=np.float64), name))
        return name

    for n in g.node:
        if n.op_type == "Gemm":
            for name in n.input[1:]:
                inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float64),
                                                             name))
            nodes.append(helper.make_node("Cast", [n.input[0]], [f"{n.name}_in64"], to=TensorProto.DOUBLE))
            gemm = helper.make_node("Gemm", [f"{n.name}_in64", *n.input[1:]], list(n.output), name=n.name)
            gemm.attribute.extend(n.attribute)
            nodes.append(gemm)
            if n.output[0] in outputs:  # the logits stay float64 (exact beyond 2^24)
                outputs[n.output[0]].type.tensor_type.elem_type = TensorProto.DOUBLE
            else:
                gemm.output[0] = f"{n.name}_out64"
                nodes.append(helper.make_node("Cast", [f"{n.name}_out64"], list(n.output), to=TensorProto.FLOAT))
            continue
        if n.op_type != "RequantShift":
            nodes.append(n)
            continue
        attrs = {a.name: numpy_helper.to_array(a.t).reshape(-1)[0] for a in n.attribute}
        d, levels, signed = int(np.log2(attrs["div"])), int(attrs["n_levels_out"]), bool(attrs["signed"])
        lo, hi = (-(levels // 2), levels // 2 - 1) if signed else (0, levels - 1)
        mul, add = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in n.input[1:])
        p = n.name
        nodes += [helper.make_node("Cast", [n.input[0]], [f"{p}_x"], to=TensorProto.DOUBLE),
                  helper.make_node("Mul", [f"{p}_x", const(f"{p}_mul64", mul)], [f"{p}_m"]),
                  helper.make_node("Add", [f"{p}_m", const(f"{p}_add64", add + _half(d))], [f"{p}_a"]),
                  helper.make_node("Div", [f"{p}_a", const(f"{p}_div64", 2.0 ** d)], [f"{p}_q"]),
                  helper.make_node("Floor", [f"{p}_q"], [f"{p}_f"]),
                  helper.make_node("Clip", [f"{p}_f", const(f"{p}_lo", lo), const(f"{p}_hi", hi)], [f"{p}_c"]),
                  helper.make_node("Cast", [f"{p}_c"], list(n.output), to=TensorProto.FLOAT)]
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
