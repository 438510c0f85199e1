"""A Deeploy export's graph as Deeploy v0.2.1's CMSIS (Cortex-M) platform maps it unmodified (docs/export.md
gives the source lines); the integer semantics are unchanged:

* ``Gemm`` becomes ``MatMul`` (int8 x int8 -> int32) + ``Add`` of the bias tiled to the batch (initializer
  ``<gemm>_bias_tiled``): the CMSIS mapping has no plain ``Gemm`` (only ``RequantizedGemm``), and the Generic
  ``Add`` kernel does not broadcast;
* a depthwise ``Conv``'s padding becomes a ``Pad`` node before it (attribute form, as Deeploy's parser reads
  it; value 0): ``CMSISDWConv2DParser`` requires ``pads == 0``;
* each depthwise ``Conv`` and its ``RequantShift`` run channels-last between two ``Transpose`` nodes, marked
  ``channels_first = 0``, weights ``(C, kh, kw, 1)``: Deeploy's NCHW-to-NHWC lowering leaves them alone
  (otherwise it makes the weights ``(1, kh, kw, C)``, which the parser refuses), and the parser's own
  transposition gives the ``(kh, kw, 1, C)`` layout that CMSIS-NN's ``arm_depthwise_conv_wrapper_s8`` reads.

:func:`for_onnxruntime` undoes the layout changes (NCHW convs, standard ``Pad``) so that onnxruntime can check
the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from labkit.export.graph import ExportError

CHANNELS_FIRST = "channels_first"


def _dims(value) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def _shape(graph, name: str, shape: list[int]) -> None:
    graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def _gemm_as_matmul_add(node, inits: dict, shapes: dict, graph) -> list:
    weight, bias = nh.to_array(inits[node.input[1]]), nh.to_array(inits[node.input[2]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ExportError(f"export --target deeploy-cmsis: {node.name}: only Gemm(A, B, C) with transA = 0, "
                          "alpha = beta = 1 is rewritten")
    weight = weight.T if attrs.get("transB", 0) else weight
    out, mm = node.output[0], f"{node.name}_mm"
    graph.initializer.extend([nh.from_array(np.ascontiguousarray(weight), f"{node.name}_weight_kn"),
                              nh.from_array(np.tile(bias.reshape(1, -1), (shapes[out][0], 1)),
                                            f"{node.name}_bias_tiled")])
    _shape(graph, mm, shapes[out])
    return [helper.make_node("MatMul", [node.input[0], f"{node.name}_weight_kn"], [mm],
                             name=f"{node.name}_MatMul"),
            helper.make_node("Add", [mm, f"{node.name}_bias_tiled"], [out], name=f"{node.name}_Add")]


def _pad_before_depthwise(node, shapes: dict, graph) -> list:
    attrs = {a.name: a for a in node.attribute}
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    if (attrs["group"].i if "group" in attrs else 1) == 1 or not any(pads):
        return [node]
    top, left, bottom, right = pads
    n, c, h, w = shapes[node.input[0]]
    padded = f"{node.name}_padded"
    shapes[padded] = [n, c, h + top + bottom, w + left + right]
    _shape(graph, padded, shapes[padded])
    pad = helper.make_node("Pad", [node.input[0]], [padded], name=f"{node.name}_Pad", mode="constant",
                           pads=[0, 0, top, left, 0, 0, bottom, right], value=0.0)
    node.input[0] = padded
    attrs["pads"].ints[:] = [0, 0, 0, 0]
    return [pad, node]


def _nhwc(shape: list[int]) -> list[int]:
    n, c, h, w = shape
    return [n, h, w, c]


def _transpose(name: str, out: str, shape: list[int], perm: list[int], graph) -> onnx.NodeProto:
    _shape(graph, out, shape)
    return helper.make_node("Transpose", [name], [out], name=f"{out}_Transpose", perm=perm)


def _channels_last(node, name: str, shape: list[int], graph) -> None:
    """``node``'s first output renamed ``name`` (NHWC ``shape``), the node marked ``channels_first = 0``."""
    _shape(graph, name, shape)
    node.output[0] = name
    node.attribute.append(helper.make_attribute(CHANNELS_FIRST, 0))


def _depthwise_channels_last(nodes: list, inits: dict, shapes: dict, graph) -> list:
    """Each depthwise Conv + RequantShift as ``Transpose, Conv, RequantShift, Transpose``."""
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
        raise ExportError(f"export --target deeploy-cmsis: depthwise conv outputs not requantized next: "
                          f"{sorted(pending)}")
    return out


def for_cmsis(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a Deeploy export (:class:`labkit.export.deeploy.DeeployWriter`) rewritten for Deeploy's CMSIS
    mapping (module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
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
    return model


def _channels_first(node) -> bool:
    return all(a.i for a in node.attribute if a.name == CHANNELS_FIRST)


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a :func:`for_cmsis` graph that onnxruntime runs with the same numbers: each channels-last
    Conv between Transposes to NCHW and back (weights ``(C, 1, kh, kw)``), each channels-last RequantShift's
    constants along the last axis, each attribute-form Pad in the opset-13 form."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type == "Pad" and not n.input[1:]:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            g.initializer.append(nh.from_array(np.array(attrs["pads"], dtype=np.int64), f"{n.name}_pads"))
            nodes.append(helper.make_node("Pad", [n.input[0], f"{n.name}_pads"], list(n.output), name=n.name,
                                          mode=attrs.get("mode", b"constant").decode()))
        elif n.op_type == "Conv" and not _channels_first(n):
            w = inits[n.input[1]]
            w.CopyFrom(nh.from_array(nh.to_array(w).transpose(0, 3, 1, 2).copy(), w.name))
            x, y = f"{n.name}_nchw_in", f"{n.name}_nchw_out"
            conv = helper.make_node("Conv", [x, *n.input[1:]], [y], name=n.name)
            conv.attribute.extend(a for a in n.attribute if a.name != CHANNELS_FIRST)
            nodes += [helper.make_node("Transpose", [n.input[0]], [x], perm=[0, 3, 1, 2]), conv,
                      helper.make_node("Transpose", [y], list(n.output), perm=[0, 2, 3, 1])]
        elif n.op_type == "RequantShift" and not _channels_first(n):
            for name in n.input[1:]:
                inits[name].CopyFrom(nh.from_array(nh.to_array(inits[name]).reshape(-1), name))
            keep = [a for a in n.attribute if a.name != CHANNELS_FIRST]
            del n.attribute[:]
            n.attribute.extend(keep)
            nodes.append(n)
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model
