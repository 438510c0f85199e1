"""Size report of an integer network: the cost model of :mod:`labkit.precision.costs` read off its layers."""

from __future__ import annotations

from torch import fx

from labkit.config.tables import Table
from labkit.integer.modules import IntAdd, IntConv2d, IntLinear, QuantizeInput, Requant
from labkit.precision.costs import LayerGeometry, QuantizerGeometry, cost_table

__all__ = ["size_report", "geometry"]

_QUANTIZERS = (QuantizeInput, Requant, IntAdd)


def geometry(inet: fx.GraphModule) -> tuple[list[LayerGeometry], list[QuantizerGeometry], dict, dict,
                                            list[str]]:
    """``(layers, quantizers, w_bits, a_bits, order)`` of the integer network, in graph order."""
    mods = dict(inet.named_modules())
    layers, quantizers, w_bits, a_bits, order = [], [], {}, {}, []
    for node in inet.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        if isinstance(m, (IntConv2d, IntLinear)):
            conv = isinstance(m, IntConv2d)
            op = "dw conv" if conv and 1 < m.groups == m.weight.shape[0] else ("conv" if conv else "linear")
            layers.append(LayerGeometry(node.target, op, m.weight.numel(),
                                        0 if m.bias is None else m.bias.numel(),
                                        m.macs, _producer(node.args[0], mods)))
            w_bits[node.target] = m.w_bits
        elif isinstance(m, _QUANTIZERS):
            out = m.act_out if isinstance(m, IntAdd) else m
            op = {QuantizeInput: "input quant", IntAdd: "integer add"}.get(type(m)) or \
                ("shift" if m.shift is not None else "requant")
            quantizers.append(QuantizerGeometry(node.target, op, tuple(out.out_shape)))
            a_bits[node.target] = out.bits
        else:
            continue
        order.append(node.target)
    return layers, quantizers, w_bits, a_bits, order


def size_report(inet: fx.GraphModule) -> Table:
    """One row per integer layer and quantizer in graph order and a ``total`` row; ``table.totals`` holds the
    totals as a dict (plus ``fp32_weight_bytes``, ``compression``, ``peak_act_bytes``, ``bops_vs_fp32``)."""
    return cost_table(*geometry(inet))


def _producer(node, mods) -> str:
    """The quantizer whose codes reach ``node`` (through flatten / pooling)."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(mods[node.target], _QUANTIZERS):
            return node.target
        node = node.args[0] if node.args else None
    raise ValueError("size_report: a layer reads no quantized tensor")
