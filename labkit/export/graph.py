"""The walk over an integer network's fx graph that every ONNX export shares: one ONNX value per fx value, in
graph order, with the shape of every tensor; the writers (standard ONNX, Deeploy) say how each layer is
written."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx

from labkit.integer import IntAdd, IntConv2d, IntegerizeError, IntLinear, IntSumPool, QuantizeInput, Requant

OPSET = 17
CUSTOM_DOMAIN = "labkit"

#: a value of the exported graph: (tensor name, element type letter: "f" float32, "d" float64, "i" int64)
Value = tuple[str, str]


class ExportError(IntegerizeError):
    """The integer network has a part that the ONNX export cannot express exactly; the message says which."""


def finn_type(lo: int, hi: int) -> str:
    """The QONNX datatype name of integers ``lo..hi``: ``UINT<b>`` when ``lo >= 0``, else ``INT<b>``."""
    if lo >= 0:
        return f"UINT{max(1, math.ceil(math.log2(hi + 1)))}"
    return f"INT{max(math.ceil(math.log2(-lo)), math.ceil(math.log2(hi + 1)) if hi > 0 else 0) + 1}"


def accumulator_type(bound: int) -> str:
    """The container of an accumulator bounded by ``|acc| <= bound``: INT32, or INT64 beyond it."""
    return "INT32" if bound < 2 ** 31 else "INT64"


class _Shapes(fx.Interpreter):
    """Output shape of every fx node on one input batch."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


class GraphWriter:
    """Emits ONNX nodes for an integer network, layer by layer; ``batch`` None: a symbolic batch ``N``.

    Subclasses implement ``conv``, ``linear``, ``requant``, ``pool``, ``add`` and ``finish``; every emitted
    tensor has its shape in ``shapes``, and integer tensors their QONNX datatype in ``dtypes``.
    """

    def __init__(self, inet: fx.GraphModule, batch: int | None):
        self.inet, self.batch = inet, batch
        self.mods = dict(inet.named_modules())
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.count = 0
        with torch.no_grad():
            runner = _Shapes(inet)
            runner.run(torch.zeros((1, *inet.input_quant.out_shape)))
        self._fx_shapes = runner.shapes

    # ------------------------------------------------------------------ helpers
    def name(self, base: str) -> str:
        self.count += 1
        return f"{base.replace('.', '_').replace('<', '').replace('>', '')}_{self.count}"

    def const(self, base: str, array: np.ndarray, dtype: str | None = None) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if dtype:
            self.dtypes[name] = dtype
        return name

    def node(self, op: str, inputs: list[str], base: str, shape: tuple, domain: str = "",
             dtype: str | None = None,
             **attrs) -> str:
        out = self.name(f"{base}_{op}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        self.shapes[out] = shape
        if dtype:
            self.dtypes[out] = dtype
        return out

    def shape_of(self, node: fx.Node) -> tuple:
        return (self.batch or "N", *self._fx_shapes[node][1:])

    # ------------------------------------------------------------------ walk
    def walk(self) -> tuple[Value, tuple]:
        """Emit every layer; returns the output value and its shape."""
        env: dict[fx.Node, Value] = {}
        output = None
        for node in self.inet.graph.nodes:
            if node.op == "placeholder":
                env[node] = ("input", "f")
                continue
            if node.op == "output":
                output = node.args[0]
                continue
            base, shape = str(node.target), self.shape_of(node)
            if node.op == "call_module":
                env[node] = self.module(node, env, base, shape)
            elif (node.op == "call_function" and node.target is torch.flatten and node.args[1:] in ((1,),
                                                                                                    ())) \
                    or (node.op == "call_method" and node.target == "flatten" and node.args[1:] in ((1,),
                                                                                                    ())):
                env[node] = self.flatten(env[node.args[0]], base, shape)
            else:
                raise ExportError(f"export: no ONNX form for node '{node.name}' ({node.op} {node.target})")
        if not isinstance(output, fx.Node) or output.op != "call_module" or \
                not isinstance(self.mods[output.target], (IntConv2d, IntLinear)):
            raise ExportError("export: the network must end with a conv/linear layer (its int logits are the "
                              "output)")
        return env[output], self.shape_of(output)

    def module(self, node: fx.Node, env: dict, base: str, shape: tuple) -> Value:
        """The ONNX value of one integer module of the graph."""
        m = self.mods[node.target]
        arg = env[node.args[0]]
        if isinstance(m, QuantizeInput):
            self.shapes["input"] = shape
            self.dtypes["input"] = finn_type(m.lo, m.hi)
            return arg
        if isinstance(m, IntConv2d):
            return self.conv(arg, m, base, shape)
        if isinstance(m, IntLinear):
            return self.linear(arg, m, base, shape)
        if isinstance(m, Requant):
            return self.requant(arg, m, base, shape)
        if isinstance(m, IntAdd):
            parts = [self.requant(env[a], r, f"{base}.acts.{i}", shape)
                     for i, (a, r) in enumerate(zip(node.args, m.acts))]
            total = self.add(parts, base, shape, sum(r.lo for r in m.acts), sum(r.hi for r in m.acts))
            return self.requant(total, m.act_out, f"{base}.act_out", shape)
        if isinstance(m, IntSumPool):
            if m.kernel_size is not None:
                raise ExportError(f"export: pool '{base}' is a windowed sum; only global average pools are "
                                  "exported")
            return self.pool(arg, base, self.shape_of(node.args[0]), shape)
        if isinstance(m, torch.nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return self.flatten(arg, base, shape)
        raise ExportError(f"export: no ONNX form for module '{node.target}' ({type(m).__name__})")

    def flatten(self, value: Value, base: str, shape: tuple) -> Value:
        return self.node("Flatten", [value[0]], base, shape, dtype=self.dtypes.get(value[0]),
                         axis=1), value[1]

    def model(self, nodes, inputs, outputs, opsets, meta: dict, value_info=()) -> onnx.ModelProto:
        graph = helper.make_graph(nodes, "integer_network", inputs, outputs, self.inits,
                                  value_info=list(value_info))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                                  producer_name="labkit")
        model.ir_version = min(model.ir_version, 10)
        scale = self.inet.output_scale.reshape(-1).tolist()
        q = self.mods["input_quant"]
        helper.set_model_props(model, {"eps_in": repr(float(self.inet.eps_in)),
                                       "output_scale": json.dumps(scale),
                                       "input_codes": json.dumps([q.lo, q.hi]), **meta})
        return model


def weight_codes(m: IntConv2d | IntLinear, dtype=np.float32) -> tuple[np.ndarray, str]:
    """The integer weights as ``dtype`` and their QONNX datatype (signed ``w_bits``)."""
    return m.weight.cpu().numpy().astype(dtype), f"INT{m.w_bits}"
