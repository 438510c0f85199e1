"""The one per-layer cost model of a quantized network: memory, MACs and BOPs, stated once.

For a quantized conv/linear with ``params`` weights, ``bias`` biases, ``macs`` multiply-accumulates per
sample, ``w`` weight bits, reading codes of ``a_in`` bits::

    weight_bytes = ceil(params * w / 8) + 4 * bias        (int32 biases)
    BOPs         = macs * w * a_in                        (bit operations)

For every quantizer (the input quantizer, each activation, each adder's output, the pool requantizer),
writing ``elements`` codes of ``a`` bits per sample::

    act_bytes    = ceil(elements * a / 8)

Accumulators and an adder's requantized inputs are not counted (they live in registers on integer
hardware). The bit-width editor predicts these numbers from the float network's shapes
(:class:`labkit.precision.bitplan.BitPlan`); the size report reads them off the integer network
(:func:`labkit.integer.size.size_report`); both call :func:`cost_table`, so the same network and bits give
the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from labkit.config.tables import Table

COLUMNS = ("layer", "op", "output", "w_bits", "a_bits", "params", "weight_bytes", "act_bytes", "MACs", "BOPs")
TOTALS = ("params", "weight_bytes", "act_bytes", "MACs", "BOPs")


@dataclass(frozen=True)
class LayerGeometry:
    """A quantized conv/linear: its weight and bias counts, MACs per sample, and the quantizer it reads."""

    name: str
    op: str  # "conv", "dw conv", "linear"
    params: int
    bias: int
    macs: int
    input: str  # name of the quantizer whose codes it reads


@dataclass(frozen=True)
class QuantizerGeometry:
    """A quantizer and the shape (per sample) of the codes it writes."""

    name: str
    op: str  # "input quant", "requant", "shift", "integer add"
    shape: tuple


def weight_bytes(params: int, w_bits: int, bias: int = 0) -> int:
    return math.ceil(params * w_bits / 8) + 4 * bias


def act_bytes(elements: int, bits: int) -> int:
    return math.ceil(elements * bits / 8)


def bops(macs: int, w_bits: int, a_in_bits: int) -> int:
    return macs * w_bits * a_in_bits


def cost_table(layers: list[LayerGeometry], quantizers: list[QuantizerGeometry], w_bits: dict[str, int],
               a_bits: dict[str, int], order: list[str] | None = None) -> Table:
    """One row per layer and per quantizer (in ``order`` when given, else layers then quantizers) and a
    ``total`` row; ``table.totals`` holds the totals plus ``fp32_weight_bytes``, ``compression``,
    ``peak_act_bytes`` and ``bops_vs_fp32`` (against 32 x 32-bit operations)."""
    rows: dict[str, dict] = {}
    for g in layers:
        w, a = w_bits[g.name], a_bits[g.input]
        rows[g.name] = {"layer": g.name, "op": g.op, "output": "", "w_bits": w, "a_bits": a,
                        "params": g.params + g.bias, "weight_bytes": weight_bytes(g.params, w, g.bias),
                        "act_bytes": 0, "MACs": g.macs, "BOPs": bops(g.macs, w, a)}
    for q in quantizers:
        a = a_bits[q.name]
        rows[q.name] = {"layer": q.name, "op": q.op, "output": "x".join(map(str, q.shape)), "w_bits": None,
                        "a_bits": a, "params": 0, "weight_bytes": 0,
                        "act_bytes": act_bytes(math.prod(q.shape), a),
                        "MACs": 0, "BOPs": 0}
    ordered = [rows[n] for n in order if n in rows] if order else list(rows.values())
    totals = {k: sum(r[k] for r in ordered) for k in TOTALS}
    fp32 = 4 * totals["params"]
    totals.update(fp32_weight_bytes=fp32, compression=fp32 / max(totals["weight_bytes"], 1),
                  peak_act_bytes=max((r["act_bytes"] for r in ordered), default=0),
                  bops_vs_fp32=totals["BOPs"] / max(sum(g.macs for g in layers) * 32 * 32, 1))
    table = Table(ordered + [{"layer": "total", "op": "", **{k: totals[k] for k in TOTALS}}], COLUMNS,
                  title=f"size: {totals['weight_bytes']:,} weight bytes ({totals['compression']:.1f}x "
                        f"smaller than FP32 {fp32:,}), {totals['act_bytes']:,} activation bytes per sample, "
                        f"{totals['MACs']:,} MACs, {totals['BOPs']:,} BOPs")
    table.totals = totals
    return table
