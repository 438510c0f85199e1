"""Size report of an integer network: per layer weight bytes at their bit-widths, activation bytes, MACs, BOPs.

``BOPs = MACs * w_bits * a_bits`` (bit operations, the usual cost measure of mixed-precision networks). Weight
bytes are ``ceil(params * w_bits / 8)`` plus 4 bytes per (int32) bias; activation bytes are the bytes of the
quantized tensor a layer writes (``elements * bits / 8``) per sample. Accumulators are not counted (they live in
registers on integer hardware). ``fp32_weight_bytes`` in the totals is the same network's float32 weights.
"""

from __future__ import annotations

import math

from torch import fx

from labkit.integerize import IntAdd, IntConv2d, IntLinear, IntSumPool, QuantizeInput, Requant
from labkit.report import Table

__all__ = ["size_report", "COLUMNS"]

COLUMNS = ("layer", "op", "output", "w_bits", "a_bits", "params", "weight_bytes", "act_bytes", "MACs", "BOPs")


def size_report(inet: fx.GraphModule) -> Table:
    """One row per integer layer in graph order and a ``total`` row; ``table.totals`` holds the totals as a dict
    (plus ``fp32_weight_bytes`` and ``compression``)."""
    mods = dict(inet.named_modules())
    rows: list[dict] = []
    for node in inet.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        row = {"layer": node.target, "output": "x".join(map(str, m.out_shape)) if getattr(m, "out_shape", None) else ""}
        if isinstance(m, (IntConv2d, IntLinear)):
            params = m.weight.numel()
            conv = isinstance(m, IntConv2d)
            depthwise = conv and m.groups > 1 and m.groups == m.weight.shape[0]
            row.update(op="dw conv" if depthwise else ("conv" if conv else "linear"), w_bits=m.w_bits,
                       a_bits=m.in_bits, params=params + (m.bias.numel() if m.bias is not None else 0),
                       weight_bytes=math.ceil(params * m.w_bits / 8) + 4 * (m.bias.numel() if m.bias is not None else 0),
                       act_bytes=0, MACs=m.macs, BOPs=m.macs * m.w_bits * m.in_bits)
        elif isinstance(m, (Requant, QuantizeInput, IntAdd)):
            out = m.act_out if isinstance(m, IntAdd) else m
            shape = m.out_shape if not isinstance(m, IntAdd) else out.out_shape
            op = {Requant: "shift" if isinstance(m, Requant) and m.shift is not None else "requant",
                  QuantizeInput: "input quant", IntAdd: "integer add"}[type(m)]
            row.update(op=op, w_bits=None, a_bits=out.bits, params=0, weight_bytes=0,
                       act_bytes=math.ceil(math.prod(shape) * out.bits / 8) if shape else 0, MACs=0, BOPs=0)
            if isinstance(m, IntAdd):
                row["output"] = "x".join(map(str, shape))
        elif isinstance(m, IntSumPool):
            row.update(op="sum pool", w_bits=None, a_bits=None, params=0, weight_bytes=0, act_bytes=0, MACs=0, BOPs=0)
        else:
            continue
        rows.append(row)
    totals = {k: sum(r[k] or 0 for r in rows) for k in ("params", "weight_bytes", "act_bytes", "MACs", "BOPs")}
    fp32 = 4 * totals["params"]
    totals.update(fp32_weight_bytes=fp32, compression=fp32 / max(totals["weight_bytes"], 1),
                  peak_act_bytes=max((r["act_bytes"] for r in rows), default=0))
    table = Table(rows + [{"layer": "total", "op": "", **{k: totals[k] for k in
                                                          ("params", "weight_bytes", "act_bytes", "MACs", "BOPs")}}],
                  COLUMNS, title=f"size: {totals['weight_bytes']:,} weight bytes ({totals['compression']:.1f}x smaller "
                                 f"than FP32 {fp32:,}), {totals['act_bytes']:,} activation bytes per sample, "
                                 f"{totals['MACs']:,} MACs, {totals['BOPs']:,} BOPs")
    table.totals = totals
    return table
