"""The standard ONNX export: the integer network in standard operators, exact in onnxruntime.

Input ``input``: the integer codes of the quantized image (float32 holding integers; ``eps_in`` in the
metadata); output ``output``: the int64 logits (in units of ``output_scale``). Conv with float32 weights
holding integer codes (every partial sum below 2^24, so float32 is exact), Gemm in float64, ReduceSum for the
global average pool (an integer sum), Add for residual adds, Flatten, and every requantization as
``Cast(double) -> Mul(mul) -> Add(add) -> Div(2^d) -> Floor -> Clip(lo, hi) -> Cast(float)`` (DORY's pattern;
all values below 2^53, so float64 is exact; a pure shift has no Mul). Integer tensors carry QONNX datatype
annotations (``finn_datatype`` in ``graph.quantization_annotation``: the input, weights, biases, accumulators
INT32 and the codes after each requantization UINT<b>/INT<b>), which onnxruntime ignores.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from labkit.export.graph import (
    OPSET,
    ExportError,
    GraphWriter,
    Value,
    accumulator_type,
    finn_type,
    weight_codes,
)
from labkit.integer import IntConv2d, IntLinear, Requant

_ONNX_TYPES = {"f": TensorProto.FLOAT, "d": TensorProto.DOUBLE, "i": TensorProto.INT64}


def _vec(t, shape: tuple) -> np.ndarray:
    """A scalar or per-channel constant as float64, shaped to broadcast over ``shape``'s channel dim."""
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
    return a.reshape((-1,) + (1,) * (len(shape) - 2)) if a.ndim else a


class StandardWriter(GraphWriter):
    """The standard-operator form (module docstring)."""

    def cast(self, value: Value, to: str, base: str) -> Value:
        name, kind = value
        if kind == to:
            return value
        out = self.node("Cast", [name], base, self.shapes[name], dtype=self.dtypes.get(name),
                        to=_ONNX_TYPES[to])
        return out, to

    def requant(self, value: Value, req: Requant, base: str, shape: tuple) -> Value:
        x, _ = self.cast(value, "d", base)
        if req.shift is not None:
            a, c, s = req.shift
            mul, add, div = 2.0 ** a, c, 2.0 ** s
        else:
            mul, add, div = req.mul, req.add, float(req.div)
        if not (isinstance(mul, float) and mul == 1.0):
            x = self.node("Mul", [x, self.const(f"{base}_mul", _vec(mul, shape))], base, shape)
        if not (isinstance(add, int) and add == 0):
            x = self.node("Add", [x, self.const(f"{base}_add", _vec(add, shape))], base, shape)
        if div != 1.0:
            x = self.node("Div", [x, self.const(f"{base}_div", np.asarray(div, dtype=np.float64))], base,
                          shape)
        x = self.node("Floor", [x], base, shape)
        lo = self.const(f"{base}_lo", np.asarray(req.lo, dtype=np.float64))
        hi = self.const(f"{base}_hi", np.asarray(req.hi, dtype=np.float64))
        x = self.node("Clip", [x, lo, hi], base, shape)
        # qonnx passes Floor's FLOAT32 on through Clip: the Cast holds it
        self.dtypes[x] = finn_type(req.lo, req.hi)
        return self.cast((x, "d"), "f", base)

    def conv(self, value: Value, m: IntConv2d, base: str, shape: tuple) -> Value:
        if not m.exact_float32:
            raise ExportError(f"export: the accumulator of conv '{base}' can reach {m.acc_bound} >= 2^24, "
                              "beyond float32-exact integers (onnxruntime runs Conv in float32 only); "
                              "quantize its weights or inputs to fewer bits")
        x, _ = self.cast(value, "f", base)
        w, wtype = weight_codes(m)
        inputs = [x, self.const(f"{base}_weight", w, wtype)]
        if m.bias is not None:
            b = m.bias.cpu().numpy()
            inputs.append(self.const(f"{base}_bias", b.astype(np.float32),
                                     finn_type(int(b.min()), int(b.max()))))
        pad = tuple(m.padding)
        out = self.node("Conv", inputs, base, shape, dtype=accumulator_type(m.acc_bound),
                        kernel_shape=list(m.weight.shape[2:]), strides=list(m.stride),
                        pads=[pad[0], pad[1], pad[0], pad[1]], dilations=list(m.dilation),
                        group=int(m.groups))
        return out, "f"

    def linear(self, value: Value, m: IntLinear, base: str, shape: tuple) -> Value:
        x, _ = self.cast(value, "d", base)
        w, wtype = weight_codes(m, np.float64)
        inputs = [x, self.const(f"{base}_weight", w, wtype)]
        if m.bias is not None:
            b = m.bias.cpu().numpy()
            inputs.append(self.const(f"{base}_bias", b.astype(np.float64),
                                     finn_type(int(b.min()), int(b.max()))))
        return self.node("Gemm", inputs, base, shape, dtype=accumulator_type(m.acc_bound), transB=1), "d"

    def pool(self, value: Value, base: str, in_shape: tuple, shape: tuple) -> Value:
        x, _ = self.cast(value, "f", base)
        axes = self.const(f"{base}_axes", np.asarray([2, 3], dtype=np.int64))
        return self.node("ReduceSum", [x, axes], base, shape, dtype="INT32", keepdims=1), "f"

    def add(self, parts: list[Value], base: str, shape: tuple, lo: int, hi: int) -> Value:
        total = parts[0]
        for p in parts[1:]:
            total = (self.node("Add", [total[0], p[0]], base, shape, dtype="INT32"), "f")
        return total

    def build(self, static_batch: bool) -> onnx.ModelProto:
        (out, kind), out_shape = self.walk()
        out, _ = self.cast((out, kind), "i", "output")
        nodes = self.nodes + [helper.make_node("Identity", [out], ["output"], name="output")]
        self.dtypes["output"] = self.dtypes.get(out, "INT32")
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shapes["input"]))
        outp = helper.make_tensor_value_info("output", TensorProto.INT64, list(out_shape))
        model = self.model(nodes, [inp], [outp], [("", OPSET)],
                           {"requant": "Mul-Add-Div-Floor-Clip",
                            "target": "qonnx" if static_batch else "onnx"})
        if static_batch:  # a shape on every tensor: qonnx's execute_onnx needs them
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        annotate(model, self.dtypes)
        return model


def annotate(model: onnx.ModelProto, dtypes: dict[str, str]) -> None:
    """QONNX datatypes as ``graph.quantization_annotation`` entries (key ``finn_datatype``, as qonnx's
    ``ModelWrapper.set_tensor_datatype`` writes them)."""
    del model.graph.quantization_annotation[:]
    for name, dtype in dtypes.items():
        entry = onnx.TensorAnnotation(tensor_name=name)
        entry.quant_parameter_tensor_names.append(onnx.StringStringEntryProto(key="finn_datatype",
                                                                              value=dtype))
        model.graph.quantization_annotation.append(entry)
