"""Copies of a labkit Deeploy export for Deeploy's test flows: a slice of its samples (a smaller static
batch), and a stopgap rewrite for Deeploy's CMSIS (Cortex-M) mapping, which the export does not yet target
(on it, Deeploy v0.2.1 runs unmodified):

* ``Gemm`` becomes ``MatMul`` (int8 x int8 -> int32) + ``Add`` of the bias tiled to the batch: the CMSIS
  mapping (``Deeploy/Targets/CortexM/Platform.py`` v0.2.1, lines 67-94) has no ``Gemm``, only
  ``RequantizedGemm``, and the Generic ``Add`` kernel does not broadcast;
* a depthwise ``Conv``'s padding becomes a ``Pad`` node before it (attribute form, value 0):
  ``CMSISDWConv2DParser`` requires ``pads == 0`` (``Deeploy/Targets/CortexM/Parsers.py`` lines 49-57).

* a depthwise ``Conv`` and its ``RequantShift`` run channels-last between two ``Transpose`` nodes, marked
  ``channels_first = 0`` with weights ``(C, kh, kw, 1)``: Deeploy's NCHW-to-NHWC lowering then leaves them
  alone. Otherwise ``NCHWtoNHWCDwConvPass`` turns the weights into ``(1, kh, kw, C)``
  (``LoweringOptimizationPasses.py`` lines 178-183) and ``CMSISDWConv2DParser`` refuses them (it wants
  ``shape[0] == group``, lines 71-73) and would transpose them once more (lines 87-90): no depthwise conv of
  an NCHW graph maps on the CMSIS platform as released. The parser's own transposition of ``(C, kh, kw, 1)``
  gives ``(kh, kw, 1, C)``, the memory layout CMSIS-NN's ``arm_depthwise_conv_wrapper_s8`` reads.

Integer semantics are unchanged by all three: the logits of ``outputs.npz`` stay the golden data. The third
makes the graph a Deeploy-only one (a Conv on NHWC data), which onnxruntime cannot run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper as nh


def _dims(value) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def _set_batch(value, n: int) -> None:
    value.type.tensor_type.shape.dim[0].dim_value = n


def batch_of(export_dir: Path) -> int:
    with np.load(export_dir / "inputs.npz") as z:
        return int(z[z.files[0]].shape[0])


def samples(export_dir: Path, out_dir: Path, start: int, n: int) -> Path:
    """The export restricted to samples ``start .. start + n - 1``: every tensor's batch dimension set to
    ``n``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("inputs", "outputs"):
        with np.load(export_dir / f"{name}.npz") as z:
            np.savez(out_dir / f"{name}.npz", **{k: z[k][start : start + n] for k in z.files})
    model = onnx.load(str(export_dir / "network.onnx"))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        _set_batch(value, n)
    for init in model.graph.initializer:  # a bias tiled to the batch by for_cmsis
        if init.name.endswith("_bias_tiled"):
            init.CopyFrom(nh.from_array(nh.to_array(init)[:n], init.name))
    onnx.save(model, str(out_dir / "network.onnx"))
    return out_dir


def _gemm_as_matmul_add(node, inits: dict, shapes: dict, graph) -> list:
    weight, bias = nh.to_array(inits[node.input[1]]), nh.to_array(inits[node.input[2]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ValueError(f"{node.name}: only Gemm(A, B, C) with transA = 0, alpha = beta = 1 is rewritten")
    if attrs.get("transB", 0):
        weight = weight.T
    out = node.output[0]
    batch = shapes[out][0]
    graph.initializer.extend(
        [
            nh.from_array(np.ascontiguousarray(weight), f"{node.name}_weight_kn"),
            nh.from_array(np.tile(bias.reshape(1, -1), (batch, 1)), f"{node.name}_bias_tiled"),
        ]
    )
    graph.value_info.append(
        helper.make_tensor_value_info(f"{node.name}_mm", onnx.TensorProto.FLOAT, shapes[out])
    )
    return [
        helper.make_node(
            "MatMul",
            [node.input[0], f"{node.name}_weight_kn"],
            [f"{node.name}_mm"],
            name=f"{node.name}_MatMul",
        ),
        helper.make_node(
            "Add", [f"{node.name}_mm", f"{node.name}_bias_tiled"], [out], name=f"{node.name}_Add"
        ),
    ]


def _pad_before_depthwise(node, shapes: dict, graph) -> list:
    attrs = {a.name: a for a in node.attribute}
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    group = attrs["group"].i if "group" in attrs else 1
    if group == 1 or not any(pads):
        return [node]
    top, left, bottom, right = pads
    n, c, h, w = shapes[node.input[0]]
    padded = f"{node.name}_padded"
    shapes[padded] = [n, c, h + top + bottom, w + left + right]
    graph.value_info.append(
        helper.make_tensor_value_info(
            padded, onnx.TensorProto.FLOAT, [n, c, h + top + bottom, w + left + right]
        )
    )
    pad = helper.make_node(
        "Pad",
        [node.input[0]],
        [padded],
        name=f"{node.name}_Pad",
        mode="constant",
        pads=[0, 0, top, left, 0, 0, bottom, right],
        value=0.0,
    )
    node.input[0] = padded
    attrs["pads"].ints[:] = [0, 0, 0, 0]
    return [pad, node]


def _transpose(name: str, out: str, shape: list[int], perm: list[int], graph) -> onnx.NodeProto:
    graph.value_info.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shape))
    return helper.make_node("Transpose", [name], [out], name=f"{out}_Transpose", perm=perm)


def _nhwc(shape: list[int]) -> list[int]:
    n, c, h, w = shape
    return [n, h, w, c]


def _channels_last(node, name: str, shape: list[int], graph) -> None:
    """``node``'s first output renamed ``name`` (NHWC ``shape``), the node marked ``channels_first = 0``."""
    graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    node.output[0] = name
    node.attribute.append(helper.make_attribute("channels_first", 0))


def _depthwise_channels_last(nodes: list, inits: dict, shapes: dict, graph) -> list:
    """Each depthwise Conv + RequantShift as ``Transpose, Conv, RequantShift, Transpose`` (see above)."""
    out, pending = [], {}  # NCHW name of a depthwise conv's output: its NHWC name
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and "group" in attrs and attrs["group"].i > 1:
            x = node.input[0]
            out.append(_transpose(x, f"{node.name}_in_nhwc", _nhwc(shapes[x]), [0, 2, 3, 1], graph))
            node.input[0] = f"{node.name}_in_nhwc"
            weight = inits[node.input[1]]
            weight.CopyFrom(nh.from_array(nh.to_array(weight).transpose(0, 2, 3, 1).copy(), weight.name))
            pending[node.output[0]] = f"{node.name}_out_nhwc"
            _channels_last(node, f"{node.name}_out_nhwc", _nhwc(shapes[node.output[0]]), graph)
            out.append(node)
        elif node.op_type == "RequantShift" and node.input[0] in pending:
            final = node.output[0]
            node.input[0] = pending.pop(node.input[0])
            _channels_last(node, f"{node.name}_out_nhwc", _nhwc(shapes[final]), graph)
            out += [node, _transpose(node.output[0], final, shapes[final], [0, 3, 1, 2], graph)]
        else:
            out.append(node)
    if pending:
        raise ValueError(f"depthwise conv outputs not requantized next: {sorted(pending)}")
    return out


def for_cmsis(export_dir: Path, out_dir: Path) -> Path:
    """The export rewritten for Deeploy's CMSIS mapping (module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("inputs.npz", "outputs.npz"):
        shutil.copy(export_dir / name, out_dir / name)
    model = onnx.load(str(export_dir / "network.onnx"))
    graph = model.graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.output, *graph.value_info]}
    inits = {i.name: i for i in graph.initializer}
    nodes, gemm_params = [], set()
    for node in list(graph.node):
        if node.op_type == "Gemm":
            nodes += _gemm_as_matmul_add(node, inits, shapes, graph)
            gemm_params.update(node.input[1:3])
        elif node.op_type == "Conv":
            nodes += _pad_before_depthwise(node, shapes, graph)
        else:
            nodes.append(node)
    nodes = _depthwise_channels_last(nodes, inits, shapes, graph)
    del graph.node[:]
    graph.node.extend(nodes)
    for name in gemm_params:
        graph.initializer.remove(inits[name])
    onnx.save(model, str(out_dir / "network.onnx"))
    return out_dir
