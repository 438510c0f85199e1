"""The integer flow of trained runs, as notebook 05 and ``labkit integerize`` / ``export`` walk it: each run's
integer twin, its element-wise check (against the float32 and the float64 fake-quant network), its int32
version (requantization as a 32-bit device computes it) and that one's agreement with the exact twin, its
size, and its exports for onnxruntime, qonnx and Deeploy.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Subset

from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.export import TARGETS, check_export, export
from labkit.integer import (
    Comparison,
    Int32Plan,
    IntegerizeError,
    compare,
    input_eps,
    input_range,
    input_shape_of,
    cmsis_twin,
    int32_twin,
    integerize,
    requant_layers,
)
from labkit.integer.size import size_report
from labkit.lab.display import Collapsed, Lines, floor_pct
from labkit.quant import QuantizerBase
from labkit.train.data import build_datasets
from labkit.train.runs import LoadedRun, RunFolder, describe_provenance, load_run


#: notebook 05's output folder and the file there with one line per integer twin (``lab_results`` reads it)
INTEGER_DIR, INTEGER_SUMMARY = "runs/integerize", "summary.json"


@dataclass
class Twin:
    """A run's fake-quant network, its integer twin and (after :func:`int32_twins`) the int32 version of
    it."""

    name: str
    run: LoadedRun
    inet: fx.GraphModule
    inet32: fx.GraphModule | None = None
    plan: Int32Plan | None = None

    @property
    def qnet(self) -> nn.Module:
        return self.run.net

    def summary(self) -> str:
        reqs = requant_layers(self.inet)
        shifts = sum(r.shift is not None for _, r in reqs)
        return (f"{self.name}: eps_in {self.inet.eps_in:.5g}, {len(reqs)} requantizations ({shifts} pure "
                f"shifts), d from {min(r.d for _, r in reqs)} to {max(r.d for _, r in reqs)}")


def integerize_run(path: str | Path, *, input_bits: int = 8, d: int | None = None,
                   pow2_input: bool | None = None,
                   config: dict | None = None) -> Twin:
    """A PACT/TQT run's network and its integer twin: input grid from the config's dataset (``pow2_input``
    defaults to true for TQT ``pow2`` networks), then :func:`labkit.integer.integerize`."""
    loaded = load_run(path, config=config)
    if not loaded.quantized:
        raise IntegerizeError(f"'{loaded.path}' holds a float network (no network.quantize in its config): "
                              "train a PACT/TQT run first, e.g. labkit train "
                              "configs/embedded/config.pact.json")
    qnet = loaded.net
    if pow2_input is None:
        pow2_input = any(m.pow2 for m in qnet.modules() if isinstance(m, QuantizerBase))
    lo, hi = input_range(loaded.config)
    eps_in = input_eps(lo, hi, input_bits, pow2=pow2_input)
    inet = integerize(qnet, eps_in, input_shape_of(loaded.config), input_bits=input_bits, d=d)
    folder = resolve(path)
    return Twin((folder if folder.is_dir() else folder.parent).name, loaded, inet)


def twin_table(nets: dict[str, Twin]) -> Table:
    """One line per twin: its run and how the run was trained (last provenance entry), input grid and
    requantizations."""
    return Table([{"network": n, "run": str(t.run.path), "provenance": _last_provenance(t.run.path),
                   "twin": t.summary().split(": ", 1)[1]} for n, t in nets.items()], title="integer twins")


def _last_provenance(path) -> str:
    entries = RunFolder(path).provenance()
    return describe_provenance(entries[-1]) if entries else "no provenance.json in the run folder"


def validation_loader(twin: Twin, limit: int | None = None, batch_size: int = 120) -> DataLoader:
    """The validation set of a twin's run (its first ``limit`` images)."""
    _, valid = build_datasets(twin.run.config["data"])
    if limit:
        valid = Subset(valid, range(min(limit, len(valid))))
    return DataLoader(valid, batch_size=batch_size)


def compare_twins(nets: dict[str, Twin], limit: int | None = None, float64: bool = False) -> dict[str,
                                                                                                  Comparison]:
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
        why = [] if r.min_identical >= target else [f"a layer at {r.min_identical:.4f}% < {target}% "
                                                    "identical codes"]
        why += [] if r.predictions == 100.0 else [f"{r.predictions:.2f}% identical predictions"]
        rows.append({"network": name, "samples": r.n, "worst layer": w["layer"],
                     "identical %": floor_pct(w["identical"]),
                     "mismatches": w["mismatches"], "max diff": w["max_diff"],
                     "end to end min %": floor_pct(r.min_e2e_identical),
                     "predictions %": floor_pct(r.predictions),
                     "top-1 integer": r.top1_int, "top-1 fake-quant": r.top1_fake,
                     "target": "met" if r.ok(target) else "not met: " + "; ".join(why)})
    return Table(rows, title="integer twin vs fake-quant network (identical % rounded down)")


def half_step_twice(twin: Twin, layer: str, limit: int = 64) -> dict:
    """What adding the rounding half-step twice does to one requantization: its comparison row."""
    broken = copy.deepcopy(twin.inet)
    req = dict(broken.named_modules())[layer]
    req.add += 1 << (req.d - 1)
    return next(r for r in compare(twin.qnet, broken, validation_loader(twin,
                                                                        limit)).layers if r["layer"] == layer)


def int32_twins(nets: dict[str, Twin], calibrate: int | None = None, margin: float = 2.0) -> dict[str,
                                                                                                  Int32Plan]:
    """Give every twin its int32 version (``twin.inet32``, :func:`labkit.integer.int32_twin`): shifts from
    bounds proven on the input grid, or (``calibrate``) from the largest values on that many training images
    times ``margin``. Returns the per-layer plans."""
    for twin in nets.values():
        calibration = None
        if calibrate:
            train, _ = build_datasets(twin.run.config["data"])
            calibration = DataLoader(Subset(train, range(min(calibrate, len(train)))), batch_size=120)
        twin.inet32, twin.plan = int32_twin(twin.inet, calibration, margin)
    return {name: twin.plan for name, twin in nets.items()}


def int32_table(plans: dict[str, Int32Plan]) -> Table:
    """One line per network: how its int32 shifts were bounded, their range and the least headroom."""
    rows = []
    for name, plan in plans.items():
        d32, w = [r["d32"] for r in plan.layers], plan.worst
        rows.append({"network": name,
                     "bounds": "proven" if plan.margin is None else f"calibrated x{plan.margin:g}",
                     "requantizations": len(plan.layers), "d (int64)": f"{min(r['d'] for r in plan.layers)}.."
                     f"{max(r['d'] for r in plan.layers)}", "d32": f"{min(d32)}..{max(d32)}",
                     "least headroom (bits)": w["headroom_bits"], "in layer": w["layer"]})
    return Table(rows, title="int32 requantization: largest shift with every partial sum inside int32")


def compare_int32(nets: dict[str, Twin], limit: int | None = None) -> dict[str, dict[str, Comparison]]:
    """Per network, the int32 twin against the exact (int64) one (``"int64"``) and against the fake-quant
    network (``"fake-quant"``), on the validation set (:func:`labkit.integer.compare`)."""
    out = {}
    for name, twin in nets.items():
        if twin.inet32 is None:
            raise IntegerizeError(f"compare_int32: twin '{name}' has no int32 version yet: call "
                                  "int32_twins(nets)")
        loader = validation_loader(twin, limit)
        out[name] = {"int64": compare(twin.inet, twin.inet32, loader),
                     "fake-quant": compare(twin.qnet, twin.inet32,
                                                                                             loader)}
    return out


def int32_agreement_table(results: dict[str, dict[str, Comparison]], target: float = 99.9) -> Table:
    """One line per network: the int32 twin's worst layer against the exact twin and against the fake-quant
    network, predictions, and whether every layer reaches ``target`` % identical codes with every prediction
    identical (layer by layer, against the exact twin)."""
    rows = []
    for name, r in results.items():
        exact, fake = r["int64"], r["fake-quant"]
        why = [] if exact.min_identical >= target else [f"'{exact.worst['layer']}' at "
                                                        f"{exact.min_identical:.4f}%"]
        why += [] if exact.predictions == 100.0 else [f"{exact.predictions:.2f}% identical predictions"]
        rows.append({"network": name, "samples": exact.n, "worst layer vs int64": exact.worst["layer"],
                     "identical %": floor_pct(exact.min_identical),
                     "end to end min %": floor_pct(exact.min_e2e_identical),
                     "predictions % (vs int64)": floor_pct(exact.predictions),
                     "worst vs fake-quant %": floor_pct(fake.min_identical),
                     "predictions % (vs fake-quant)": floor_pct(fake.predictions),
                     "top-1 int32": exact.top1_int,
                     "top-1 int64": exact.top1_fake,
                     "target": "met" if not why else "not met: " + "; ".join(why)})
    return Table(rows, title=f"int32 twin vs exact (int64) twin, target >= {target}% identical codes per "
                             "layer (identical % rounded down)")


def int32_layers(results: dict[str, Comparison], agreement: dict[str, dict[str, Comparison]],
                 plans: dict[str, Int32Plan], name: str | None = None) -> Collapsed:
    """Per requantization of one network (default: the first): its shifts and headroom, and its share of
    identical codes (layer by layer) for int64 vs fake-quant, int32 vs fake-quant and int32 vs int64;
    collapsed."""
    name = name or next(iter(plans))
    columns = [results[name].code_layers, agreement[name]["fake-quant"].code_layers,
               agreement[name]["int64"].code_layers]
    rows = [{"layer": p["layer"], "d": p["d"], "d32": p["d32"], "headroom bits": p["headroom_bits"],
             "int64 vs fake-quant %": floor_pct(a["identical"]),
             "int32 vs fake-quant %": floor_pct(b["identical"]),
             "int32 vs int64 %": floor_pct(c["identical"]),
             "int32 vs int64 end to end %": floor_pct(c["e2e_identical"])}
            for p, a, b, c in zip(plans[name].layers, *columns)]
    differing = sum(r["int32 vs int64 %"] != "100" for r in rows)
    return Collapsed(Table(rows, title=f"{name}: identical codes per layer, exact (int64) and int32 "
                                       "requantization"),
                     f"{name}: {differing} of {len(rows)} requantizations where int32 and int64 codes differ")


def int32_details(plans: dict[str, Int32Plan], name: str | None = None) -> Collapsed:
    """One network's int32 plan (default: the first): per layer its input interval, shifts, bound,
    headroom."""
    name = name or next(iter(plans))
    return Collapsed(plans[name].table(), f"{name}: {plans[name].summary()}")


def size_table(nets: dict[str, Twin]) -> Table:
    """One line per network: the totals of :func:`labkit.integer.size.size_report`."""
    rows = []
    for name, twin in nets.items():
        t = size_report(twin.inet).totals
        rows.append({"network": name, "weight bytes": t["weight_bytes"],
                     "x smaller than FP32": round(t["compression"], 2),
                     "activation bytes": t["act_bytes"], "largest activation": t["peak_act_bytes"],
                     "MACs": t["MACs"],
                     "BOPs": t["BOPs"]})
    return Table(rows, title="integer networks: memory and operations per sample")


def export_twins(nets: dict[str, Twin], output_dir: str | Path, n_inputs: int = 8) -> Table:
    """Export each twin for every target into ``output_dir/export-<name>[-<target>]`` (golden data from the
    first ``n_inputs`` validation images; the standard one with every layer's activations; ``deeploy`` from
    the int32 twin, made with proven bounds when :func:`int32_twins` was not called; ``deeploy-cmsis`` from
    the CMSIS twin) and check each with onnxruntime."""
    rows = []
    for name, twin in nets.items():
        _, valid = build_datasets(twin.run.config["data"])
        inputs = torch.stack([valid[i][0] for i in range(min(n_inputs, len(valid)))])
        if twin.inet32 is None:
            twin.inet32, twin.plan = int32_twin(twin.inet)
        networks = {"deeploy": twin.inet32, "deeploy-cmsis": cmsis_twin(twin.inet)[0]}
        for target in TARGETS:
            folder = resolve(output_dir) / (f"export-{name}" + ("" if target == "onnx" else f"-{target}"))
            export(networks.get(target, twin.inet), folder, inputs, target=target,
                   activations=target == "onnx")
            check = check_export(folder)
            rows.append({"network": name, "target": target, "folder": str(folder),
                         "onnxruntime": "exact" if check["exact"] else "DIFFERENT",
                         "max |difference|": check["max_abs_diff"], "nodes": check["onnx_nodes"],
                         "ops": ", ".join(check["ops"])})
    return Table(rows, title=f"exports ({n_inputs} validation images; deeploy: the int32 twin, "
                             "deeploy-cmsis: the CMSIS twin, their RequantShift nodes run in Deeploy's "
                             "semantics)")


def _verdict(r: Comparison, target: float) -> str:
    """``target met`` or ``target NOT met: <why>`` for one comparison."""
    why = [] if r.min_identical >= target else [f"'{r.worst['layer']}' has {r.worst['mismatches']} differing "
                                                f"codes ({floor_pct(r.min_identical)}% < {target}%)"]
    why += [] if r.predictions == 100.0 else [f"{floor_pct(r.predictions)}% identical predictions (< 100%)"]
    why += [] if r.top1_int is None or r.top1_int == r.top1_fake else ["the top-1s differ"]
    return "target met" if not why else "target NOT met: " + "; ".join(why)


def summary(results: dict[str, Comparison], target: float = 99.99) -> Lines:
    """One line per network: worst layer's codes, predictions, top-1 fake-quant vs integer, the verdict and
    why."""
    lines = []
    for name, r in results.items():
        w = r.worst
        top1 = (
            ""
            if r.top1_int is None
            else f"; top-1 fake-quant {r.top1_fake:.2f}% vs integer {r.top1_int:.2f}%"
        )
        lines.append(f"{name}: {_verdict(r, target)} ({r.n} images; codes: worst layer '{w['layer']}' "
                     f"{floor_pct(w['identical'])}% identical, {w['mismatches']} differ, max difference "
                     f"{w['max_diff']}; predictions {floor_pct(r.predictions)}% identical{top1})")
    return Lines(lines, f"integer twin vs {next(iter(results.values())).reference} network (target: >= "
                        f"{target}% identical codes in every layer, every prediction identical, equal top-1)")


def layer_details(results: dict[str, Comparison], name: str | None = None) -> Collapsed:
    """Per layer of one network (default: the first), layers with differing codes first; collapsed."""
    name = name or next(iter(results))
    r = results[name]
    rows = sorted(r.layers, key=lambda row: (row["mismatches"] == 0, r.layers.index(row)))
    rows = [{**row, "identical": floor_pct(row["identical"]),
             "e2e_identical": floor_pct(row["e2e_identical"])}
            for row in rows]
    differing = sum(row["mismatches"] > 0 for row in r.code_layers)
    return Collapsed(Table(rows, r.COLUMNS, title=f"{name}: per layer, differing layers first (identical % "
                                                  "rounded down)"),
                     f"{name}: {differing} of {len(r.code_layers)} layers with differing codes")


def conclude(results: dict[str, Comparison], agreement: dict[str, dict[str, Comparison]], exports: Table,
             output_dir: str | Path) -> Lines:
    """What notebook 05 saw, per network: integer vs fake-quant, int32 vs int64, the exports; also written to
    ``output_dir/summary.json`` (``labkit lab`` prints it)."""
    records, lines = [], []
    for name, r in results.items():
        int32 = agreement.get(name, {}).get("int64")
        folders = [row for row in exports.rows if row["network"] == name]
        exact = sum(row["onnxruntime"] == "exact" for row in folders)
        records.append({"network": name, "top1_fake": r.top1_fake, "top1_int": r.top1_int,
                        "predictions": r.predictions,
                        "min_identical": float(floor_pct(r.min_identical)),
                        "export": str(resolve(output_dir)),
                        "int32_min_identical": int32 and float(floor_pct(int32.min_identical))})
        lines.append(f"{name}: integer top-1 {r.top1_int:.2f}% (fake-quant {r.top1_fake:.2f}%), "
                     f"{floor_pct(r.predictions)}% "
                     f"of {r.n} predictions identical, worst layer {floor_pct(r.min_identical)}% identical "
                     "codes; "
                     + (f"int32 twin: worst layer {floor_pct(int32.min_identical)}% identical to int64 on "
                        f"{int32.n} images; " if int32 else "")
                     + f"exports exact in onnxruntime: {exact} of {len(folders)}")
    path = resolve(output_dir) / INTEGER_SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return Lines(lines, f"what we saw (also in {path})")
