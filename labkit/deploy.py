"""The integer flow of trained runs, as notebook 05 and ``labkit integerize`` / ``export`` walk it: each run's
integer twin, its element-wise check (against the float32 and the float64 fake-quant network), its size,
and its exports.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Subset

from labkit.data import build_datasets
from labkit.export import check_export, export
from labkit.integer import (Comparison, IntegerizeError, compare, input_eps, input_range, input_shape_of, integerize,
                            requant_layers)
from labkit.integer.size import size_report
from labkit.lab import ensure_run
from labkit.paths import resolve
from labkit.quant import QuantizerBase
from labkit.report import Table
from labkit.runs import LoadedRun, load_run


@dataclass
class Twin:
    """A run's fake-quant network and its integer twin."""

    name: str
    run: LoadedRun
    inet: fx.GraphModule

    @property
    def qnet(self) -> nn.Module:
        return self.run.net

    def summary(self) -> str:
        reqs = requant_layers(self.inet)
        shifts = sum(r.shift is not None for _, r in reqs)
        return (f"{self.name}: eps_in {self.inet.eps_in:.5g}, {len(reqs)} requantizations ({shifts} pure shifts), "
                f"d from {min(r.d for _, r in reqs)} to {max(r.d for _, r in reqs)}")


def integerize_run(path: str | Path, *, input_bits: int = 8, d: int | None = None, pow2_input: bool | None = None,
                   config: dict | None = None) -> Twin:
    """A PACT/TQT run's network and its integer twin: input grid from the config's dataset (``pow2_input``
    defaults to true for TQT ``pow2`` networks), then :func:`labkit.integer.integerize`."""
    loaded = load_run(path, config=config)
    if not loaded.quantized:
        raise IntegerizeError(f"'{loaded.path}' holds a float network (no network.quantize in its config): train a "
                              "PACT/TQT run first, e.g. labkit train configs/embedded/config.pact.json")
    qnet = loaded.net
    if pow2_input is None:
        pow2_input = any(m.pow2 for m in qnet.modules() if isinstance(m, QuantizerBase))
    lo, hi = input_range(loaded.config)
    eps_in = input_eps(lo, hi, input_bits, pow2=pow2_input)
    inet = integerize(qnet, eps_in, input_shape_of(loaded.config), input_bits=input_bits, d=d)
    folder = resolve(path)
    return Twin((folder if folder.is_dir() else folder.parent).name, loaded, inet)


def twins(runs: list[str], fallback_dir: str | Path, *, short_epochs: int = 2, input_bits: int = 8,
          d: int | None = None, device: str = "cpu") -> dict[str, Twin]:
    """The integer twin of each run folder; a missing run is replaced by a short run of its config
    (``runs/<data>-<name>`` -> ``configs/<data>/config.<name>.json``) in ``fallback_dir``."""
    out = {}
    for run in runs:
        data, _, name = resolve(run).name.partition("-")
        folder = ensure_run(run, f"configs/{data}/config.{name}.json", resolve(fallback_dir) / f"short-{name}",
                            short_epochs, device)
        twin = integerize_run(folder, input_bits=input_bits, d=d)
        out[twin.name] = twin
    return out


def twin_table(nets: dict[str, Twin]) -> Table:
    """One line per twin: its run, input grid and requantizations."""
    return Table([{"network": n, "run": str(t.run.path), "twin": t.summary().split(": ", 1)[1]} for n, t in nets.items()],
                 title="integer twins")


def validation_loader(twin: Twin, limit: int | None = None, batch_size: int = 120) -> DataLoader:
    """The validation set of a twin's run (its first ``limit`` images)."""
    _, valid = build_datasets(twin.run.config["data"])
    if limit:
        valid = Subset(valid, range(min(limit, len(valid))))
    return DataLoader(valid, batch_size=batch_size)


def compare_twins(nets: dict[str, Twin], limit: int | None = None, float64: bool = False) -> dict[str, Comparison]:
    """:func:`labkit.integer.compare` of every twin on its validation set; ``float64`` compares against a
    float64 copy of the fake-quant network (the exact reference: same weights, same grids)."""
    results = {}
    for name, twin in nets.items():
        qnet, inet = twin.qnet, twin.inet
        if float64:
            qnet = copy.deepcopy(qnet).double()
            inet = integerize(qnet, inet.eps_in, input_shape_of(twin.run.config),
                              input_bits=inet.input_quant.bits, d=None)
        results[name] = compare(qnet, inet, validation_loader(twin, limit))
    return results


def comparison_table(results: dict[str, Comparison], target: float = 99.99) -> Table:
    """One line per network: worst layer, end-to-end agreement, predictions, top-1s, target met or why not."""
    rows = []
    for name, r in results.items():
        w = r.worst
        why = [] if r.min_identical >= target else [f"a layer at {r.min_identical:.4f}% < {target}% identical codes"]
        why += [] if r.predictions == 100.0 else [f"{r.predictions:.2f}% identical predictions"]
        rows.append({"network": name, "samples": r.n, "worst layer": w["layer"], "identical %": _floor(w["identical"]),
                     "mismatches": w["mismatches"], "max diff": w["max_diff"],
                     "end to end min %": _floor(r.min_e2e_identical), "predictions %": _floor(r.predictions),
                     "top-1 integer": r.top1_int, "top-1 fake-quant": r.top1_fake,
                     "target": "met" if r.ok(target) else "not met: " + "; ".join(why)})
    return Table(rows, title="integer twin vs fake-quant network (identical % rounded down)")


def half_step_twice(twin: Twin, layer: str, limit: int = 64) -> dict:
    """What adding the rounding half-step twice does to one requantization: its comparison row."""
    broken = copy.deepcopy(twin.inet)
    req = dict(broken.named_modules())[layer]
    req.add += 1 << (req.d - 1)
    return next(r for r in compare(twin.qnet, broken, validation_loader(twin, limit)).layers if r["layer"] == layer)


def size_table(nets: dict[str, Twin]) -> Table:
    """One line per network: the totals of :func:`labkit.integer.size.size_report`."""
    rows = []
    for name, twin in nets.items():
        t = size_report(twin.inet).totals
        rows.append({"network": name, "weight bytes": t["weight_bytes"], "x smaller than FP32": round(t["compression"], 2),
                     "activation bytes": t["act_bytes"], "largest activation": t["peak_act_bytes"], "MACs": t["MACs"],
                     "BOPs": t["BOPs"]})
    return Table(rows, title="integer networks: memory and operations per sample")


def export_twins(nets: dict[str, Twin], output_dir: str | Path, n_inputs: int = 8) -> Table:
    """Export each twin (``network.onnx`` + golden data, activations included) into
    ``output_dir/export-<name>``, check it with onnxruntime, and write the RequantShift variant beside it."""
    rows = []
    for name, twin in nets.items():
        _, valid = build_datasets(twin.run.config["data"])
        inputs = torch.stack([valid[i][0] for i in range(min(n_inputs, len(valid)))])
        folder = resolve(output_dir) / f"export-{name}"
        export(twin.inet, folder, inputs, activations=True)
        check = check_export(folder)
        export(twin.inet, Path(f"{folder}-requantshift"), inputs[:2], requant_shift=True)
        rows.append({"network": name, "folder": str(folder), "onnxruntime": "exact" if check["exact"] else "DIFFERENT",
                     "max |difference|": check["max_abs_diff"], "nodes": check["onnx_nodes"],
                     "ops": ", ".join(check["ops"])})
    return Table(rows, title=f"exports ({n_inputs} validation images; RequantShift variants in <folder>-requantshift)")


def _floor(value: float, digits: int = 4) -> float:
    """Round down, so that 99.99996% never shows as 100."""
    scale = 10 ** digits
    return int(value * scale) / scale
