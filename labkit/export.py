"""Export of an integer network (:func:`labkit.integerize.integerize`) as ONNX plus golden data.

An export folder holds:

* ``network.onnx``: the integer network in standard ONNX operators. Its input ``input`` is the integer codes of
  the quantized image (float32 tensor holding integers; ``eps_in`` in the model's metadata), its output
  ``output`` the int64 logits (in units of ``output_scale``, also in the metadata).
  Conv (float32 weights holding integer codes; every partial sum stays below 2^24, so float32 is exact), Gemm
  (float64), ReduceSum for the average pool (an integer sum), Add for residual adds, Flatten, and every
  requantization as ``Cast(double) -> Mul(mul) -> Add(add) -> Div(2^d) -> Floor -> Clip(lo, hi) ->
  Cast(float)`` (the pattern DORY reads; all values below 2^53, so float64 is exact; a pure shift has no Mul).
  With ``requant_shift=True`` each requantization is one ``RequantShift`` node instead (domain ``labkit``,
  inputs ``(x, mul, add)``, attributes ``div``, ``n_levels_out``, ``signed``, semantics
  ``clip(floor((x * mul + add) / div))`` with the rounding half-step already inside ``add``), as Deeploy reads it;
  onnxruntime cannot run that variant.
* ``inputs.npz`` (``input``: the codes fed to the network), ``outputs.npz`` (``output``: int64 logits) and, with
  ``activations=True``, ``activations.npz``: the output of every integer layer keyed by module name, each in the
  smallest integer dtype that holds it (uint8/int8 codes, int32 accumulators).

:func:`check_export` runs ``network.onnx`` with onnxruntime on ``inputs.npz`` and compares with ``outputs.npz``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import fx

from labkit.integer import (IntAdd, IntConv2d, IntegerizeError, IntLinear, IntSumPool, QuantizeInput, Requant,
                            integer_layers)

__all__ = ["ExportError", "to_onnx", "export", "check_export", "OPSET", "CUSTOM_DOMAIN"]

OPSET = 17
CUSTOM_DOMAIN = "labkit"


class ExportError(IntegerizeError):
    """The integer network has a part that the ONNX export cannot express exactly; the message says which."""


class _OnnxBuilder:
    def __init__(self, inet: fx.GraphModule, requant_shift: bool):
        self.onnx, self.helper, self.T = onnx, helper, TensorProto
        self.inet, self.requant_shift = inet, requant_shift
        self.mods = dict(inet.named_modules())
        self.nodes, self.inits = [], []
        self.count = 0

    # ------------------------------------------------------------------ helpers
    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base.replace('.', '_')}_{self.count}"

    def _const(self, base: str, array: np.ndarray) -> str:
        name = self._name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self._name(f"{base}_{op}")
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def _cast(self, value: tuple[str, str], to: str, base: str) -> tuple[str, str]:
        name, dtype = value
        if dtype == to:
            return value
        target = {"f": self.T.FLOAT, "d": self.T.DOUBLE, "i": self.T.INT64}[to]
        return self._node("Cast", [name], base, to=target), to

    # ------------------------------------------------------------------ layers
    def requant(self, value: tuple[str, str], req: Requant, base: str, ndim: int) -> tuple[str, str]:
        shape = (-1,) + (1,) * (ndim - 2) if req.mul.dim() else ()

        def vec(t) -> np.ndarray:
            a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
            return a.reshape(shape) if a.ndim else a

        if self.requant_shift:
            x, _ = self._cast(value, "f", base)
            # int64: mul and add need up to ~50 bits at the automatic d (float32 would round them)
            mul = self._const(f"{base}_mul", vec(req.mul).astype(np.int64))
            add = self._const(f"{base}_add", vec(req.add).astype(np.int64))
            out = self._node("RequantShift", [x, mul, add], base, domain=CUSTOM_DOMAIN, div=int(req.div),
                             n_levels_out=int(req.n_levels), signed=int(req.signed))
            return out, "f"
        x, _ = self._cast(value, "d", base)
        if req.shift is not None:
            a, c, s = req.shift
            mul, add, div = 2.0 ** a, c, 2.0 ** s
        else:
            mul, add, div = req.mul, req.add, float(req.div)
        if not (isinstance(mul, float) and mul == 1.0):
            x = self._node("Mul", [x, self._const(f"{base}_mul", vec(mul))], base)
        if not (isinstance(add, int) and add == 0):
            x = self._node("Add", [x, self._const(f"{base}_add", vec(add))], base)
        if div != 1.0:
            x = self._node("Div", [x, self._const(f"{base}_div", np.asarray(div, dtype=np.float64))], base)
        x = self._node("Floor", [x], base)
        lo = self._const(f"{base}_lo", np.asarray(req.lo, dtype=np.float64))
        hi = self._const(f"{base}_hi", np.asarray(req.hi, dtype=np.float64))
        x = self._node("Clip", [x, lo, hi], base)
        return self._cast((x, "d"), "f", base)

    def conv(self, value, m: IntConv2d, base: str) -> tuple[str, str]:
        if not m.exact_float32:
            raise ExportError(f"export: the accumulator of conv '{base}' can reach {m.acc_bound} >= 2^24, beyond "
                              "float32-exact integers (onnxruntime runs Conv in float32 only); quantize its weights "
                              "or inputs to fewer bits")
        x, _ = self._cast(value, "f", base)
        inputs = [x, self._const(f"{base}_weight", m.weight.cpu().numpy().astype(np.float32))]
        if m.bias is not None:
            inputs.append(self._const(f"{base}_bias", m.bias.cpu().numpy().astype(np.float32)))
        pad = tuple(m.padding)
        out = self._node("Conv", inputs, base, kernel_shape=list(m.weight.shape[2:]), strides=list(m.stride),
                         pads=[pad[0], pad[1], pad[0], pad[1]], dilations=list(m.dilation), group=int(m.groups))
        return out, "f"

    def linear(self, value, m: IntLinear, base: str) -> tuple[str, str]:
        x, _ = self._cast(value, "d", base)
        inputs = [x, self._const(f"{base}_weight", m.weight.cpu().numpy().astype(np.float64))]
        if m.bias is not None:
            inputs.append(self._const(f"{base}_bias", m.bias.cpu().numpy().astype(np.float64)))
        return self._node("Gemm", inputs, base, transB=1), "d"

    def pool(self, value, m: IntSumPool, base: str) -> tuple[str, str]:
        if m.kernel_size is not None:
            raise ExportError(f"export: pool '{base}' is a windowed sum; only global average pools are exported")
        x, _ = self._cast(value, "f", base)
        axes = self._const(f"{base}_axes", np.asarray([2, 3], dtype=np.int64))
        return self._node("ReduceSum", [x, axes], base, keepdims=1), "f"

    # ------------------------------------------------------------------ graph
    def build(self):
        env: dict[fx.Node, tuple[str, str]] = {}
        shapes: dict[fx.Node, int] = {}
        input_shape = None
        output = None
        for node in self.inet.graph.nodes:
            if node.op == "placeholder":
                env[node] = ("input", "f")
                continue
            if node.op == "output":
                output = self._cast(env[node.args[0]], "i", "output")
                src = node.args[0]
                out_shape = getattr(self.mods.get(src.target), "out_shape", None) if src.op == "call_module" else None
                continue
            base = str(node.target)
            if node.op == "call_module":
                m = self.mods[node.target]
                arg = env[node.args[0]]
                if isinstance(m, QuantizeInput):
                    input_shape = m.out_shape
                    env[node] = arg
                    shapes[node] = len(m.out_shape) + 1
                elif isinstance(m, IntConv2d):
                    env[node] = self.conv(arg, m, base)
                    shapes[node] = 4
                elif isinstance(m, IntLinear):
                    env[node] = self.linear(arg, m, base)
                    shapes[node] = 2
                elif isinstance(m, Requant):
                    env[node] = self.requant(arg, m, base, shapes[node.args[0]])
                    shapes[node] = shapes[node.args[0]]
                elif isinstance(m, IntAdd):
                    ndim = shapes[node.args[0]]
                    parts = [self.requant(env[a], r, f"{base}.acts.{i}", ndim)
                             for i, (a, r) in enumerate(zip(node.args, m.acts))]
                    total = parts[0]
                    for p in parts[1:]:
                        total = (self._node("Add", [total[0], p[0]], base), "f")
                    env[node] = self.requant(total, m.act_out, f"{base}.act_out", ndim)
                    shapes[node] = ndim
                elif isinstance(m, IntSumPool):
                    env[node] = self.pool(arg, m, base)
                    shapes[node] = shapes[node.args[0]]
                elif isinstance(m, torch.nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                    env[node] = (self._node("Flatten", [arg[0]], base, axis=1), arg[1])
                    shapes[node] = 2
                else:
                    raise ExportError(f"export: no ONNX form for module '{node.target}' ({type(m).__name__})")
            elif (node.op == "call_function" and node.target is torch.flatten and node.args[1:] in ((1,), ())) \
                    or (node.op == "call_method" and node.target == "flatten" and node.args[1:] in ((1,), ())):
                arg = env[node.args[0]]
                env[node] = (self._node("Flatten", [arg[0]], base.replace("<", "").replace(">", ""), axis=1), arg[1])
                shapes[node] = 2
            else:
                raise ExportError(f"export: no ONNX form for node '{node.name}' ({node.op} {node.target})")
        h = self.helper
        inp = h.make_tensor_value_info("input", self.T.FLOAT, ["N", *input_shape])
        nodes = self.nodes
        nodes.append(h.make_node("Identity", [output[0]], ["output"], name="output"))
        if not out_shape:
            raise ExportError("export: the network must end with a layer of known output shape (conv/linear)")
        out = h.make_tensor_value_info("output", self.T.INT64, ["N", *out_shape])
        graph = h.make_graph(nodes, "integer_network", [inp], [out], self.inits)
        opsets = [h.make_opsetid("", OPSET)] + ([h.make_opsetid(CUSTOM_DOMAIN, 1)] if self.requant_shift else [])
        model = h.make_model(graph, opset_imports=opsets, producer_name="labkit")
        model.ir_version = min(model.ir_version, 10)
        scale = self.inet.output_scale.reshape(-1).tolist()
        meta = {"eps_in": repr(float(self.inet.eps_in)), "output_scale": json.dumps(scale),
                "input_codes": json.dumps([self.mods["input_quant"].lo, self.mods["input_quant"].hi]),
                "requant": "RequantShift" if self.requant_shift else "Mul-Add-Div-Floor-Clip"}
        h.set_model_props(model, meta)
        return model


def to_onnx(inet: fx.GraphModule, path: str | Path | None = None, *, requant_shift: bool = False):
    """The ONNX model of ``inet`` (module docstring); written to ``path`` when given."""
    model = _OnnxBuilder(inet, requant_shift).build()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(model.SerializeToString())
    return model


@torch.no_grad()
def export(inet: fx.GraphModule, out_dir: str | Path, inputs: torch.Tensor, *, requant_shift: bool = False,
           activations: bool = False) -> dict[str, Path]:
    """Write ``network.onnx``, ``inputs.npz``, ``outputs.npz`` (and ``activations.npz``) into ``out_dir``.

    ``inputs``: a float batch of normalised images (quantized here by ``inet.input_quant``). Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"network": out / "network.onnx", "inputs": out / "inputs.npz", "outputs": out / "outputs.npz"}
    to_onnx(inet, paths["network"], requant_shift=requant_shift)
    captured: dict[str, np.ndarray] = {}
    hooks = []
    if activations:
        for name, m in integer_layers(inet):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, y, name=name: captured.__setitem__(name, _compact(y))))
    try:
        codes = inet.input_quant(inputs)
        logits = inet(inputs)
    finally:
        for hk in hooks:
            hk.remove()
    np.savez(paths["inputs"], input=codes.cpu().numpy().astype(np.float32))
    np.savez(paths["outputs"], output=logits.cpu().numpy().astype(np.int64))
    if activations:
        paths["activations"] = out / "activations.npz"
        np.savez(paths["activations"], **captured)
    return paths


def _compact(t: torch.Tensor) -> np.ndarray:
    """The smallest integer dtype that holds ``t`` (int8/uint8 codes, int32 accumulators)."""
    a = t.detach().cpu().numpy()
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dt in (np.uint8, np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a.astype(np.int64)


def check_export(out_dir: str | Path) -> dict:
    """Run ``network.onnx`` with onnxruntime on ``inputs.npz``; compare with ``outputs.npz`` (must be equal)."""
    out = Path(out_dir)
    model = onnx.load(str(out / "network.onnx"))
    onnx.checker.check_model(model, full_check=True)
    if any(n.domain == CUSTOM_DOMAIN for n in model.graph.node):
        raise ExportError(f"check_export: {out / 'network.onnx'} uses RequantShift nodes, which onnxruntime cannot "
                          "run; export without requant_shift to check the numbers")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out / "network.onnx"), options, providers=["CPUExecutionProvider"])
    with np.load(out / "inputs.npz") as f:
        x = f["input"]
    with np.load(out / "outputs.npz") as f:
        expected = f["output"]
    got = session.run(["output"], {"input": x})[0]
    diff = int(np.abs(got.astype(np.int64) - expected).max()) if expected.size else 0
    return {"samples": int(x.shape[0]), "exact": bool(got.dtype == expected.dtype and np.array_equal(got, expected)),
            "max_abs_diff": diff, "onnx_nodes": len(model.graph.node),
            "ops": sorted({n.op_type for n in model.graph.node})}
