"""The accuracy-versus-cost view of measured runs: each plan placed by :mod:`labkit.precision.costs`, seeds
averaged.

:func:`collect_points` reads run folders (or folders of runs: a sweep's output, ``runs/``), groups the runs
whose configs differ only in ``training.seed`` (one plan, several seeds; a run that has not reached its
``training.n_epochs`` is left out and named in the title), and gives per group the final validation top-1
(mean, worst and best seed; every seed's in ``top1s``, not a column) and the plan's ``weight_bytes``,
``act_bytes`` and ``BOPs``
(:meth:`labkit.precision.bitplan.BitPlan.totals`). Kinds: ``fp32``; ``uniform`` (one weight and one activation
bit-width everywhere); ``proposed`` (a config written by :mod:`labkit.precision.allocate`); ``mixed`` (any
other per-layer plan, e.g. from the bit-width editor). :func:`labkit.lab.plots.plot_pareto` draws them.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

from labkit.config.budget import parse_budget
from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.precision.bitplan import INPUT, BitPlan
from labkit.train.runs import CONFIG, HISTORY, RunFolder, config_hash

COLUMNS = ("label", "kind", "n", "top1", "top1_min", "top1_max", "seeds", "weight_bytes", "act_bytes", "BOPs",
           "runs")
PROPOSED = re.compile(r"^Proposed mixed precision \((?P<bits>[^)]*)\) for (?P<budget>[^;]*);")


def run_folders(paths) -> list[Path]:
    """Each path that is a run folder (config and history), else the run folders directly inside it."""
    found = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        folder = resolve(path)
        if (folder / CONFIG).is_file() and (folder / HISTORY).is_file():
            found.append(folder)
        elif folder.is_dir():
            found += sorted(p for p in folder.iterdir() if (p / CONFIG).is_file() and (p / HISTORY).is_file())
    return found


def collect_points(paths) -> Table:
    """One row per plan (runs that differ only in seed), columns :data:`COLUMNS` (see the module
    docstring)."""
    groups: dict[str, dict] = {}
    unfinished = []
    for folder in run_folders(paths):
        run = RunFolder(folder)
        history, cfg = run.history(), run.config()
        if not history or history[-1]["epoch"] + 1 < cfg["training"].get("n_epochs", 0):
            unfinished.append(folder.name)  # its last epoch is not the final accuracy of its schedule
            continue
        unseeded = copy.deepcopy(cfg)
        seed = unseeded["training"].pop("seed", 0)
        key = config_hash(unseeded)
        if key not in groups:
            groups[key] = {**describe_plan(cfg), "top1s": [], "seeds": [], "runs": []}
        group = groups[key]
        group["top1s"].append(history[-1]["valid"]["top1"])
        group["seeds"].append(seed)
        group["runs"].append(str(folder))
    rows = []
    for g in groups.values():
        top1s = g.pop("top1s")
        rows.append({**g, "n": len(top1s), "top1": sum(top1s) / len(top1s), "top1_min": min(top1s),
                     "top1_max": max(top1s), "seeds": " ".join(map(str, g["seeds"])),
                     "runs": " ".join(g["runs"]),
                     "top1s": top1s})
    rows.sort(key=lambda r: (r["kind"] == "fp32", r.get("weight_bytes") or 0))
    left_out = f"; left out, unfinished: {', '.join(unfinished)}" if unfinished else ""
    return Table(rows, COLUMNS, title=f"{len(rows)} plans from {sum(r['n'] for r in rows)} runs "
                                      f"(top-1: final validation, mean over seeds){left_out}")


def describe_plan(cfg: dict) -> dict:
    """``label``, ``kind`` and the cost totals of a run's config (FP32: no totals)."""
    if not cfg["network"].get("quantize"):
        return {"label": "FP32", "kind": "fp32", "weight_bytes": None, "act_bytes": None, "BOPs": None}
    plan = BitPlan.from_config({**cfg, "network": {**cfg["network"], "pretrained": None}})
    totals = plan.totals()
    w = set(plan.w_bits.values())
    a = {b for k, b in plan.a_bits.items() if k != INPUT}
    algorithm = "TQT" if '"tqt": true' in json.dumps(cfg["network"]["quantize"]) else "PACT"
    proposed = PROPOSED.match(cfg.get("description") or "")
    if proposed:
        kind, label = "proposed", f"{algorithm} proposed, {proposed['budget']}"
    elif len(w) == 1 and len(a) <= 1:
        kind, label = "uniform", f"{algorithm} W{min(w)}/A{min(a or w)}"
    else:
        kind, label = "mixed", f"{algorithm} {plan.describe()}"
    return {"label": label, "kind": kind, **{k: totals[k] for k in ("weight_bytes", "act_bytes", "BOPs")}}


# ------------------------------------------------------------------------------------------- paired seeds
PAIRED_COLUMNS = ("plan", "reference", "n", "plan_top1", "reference_top1", "diff", "diff_std", "diff_min",
                  "wins", "worst_drop", "per_seed")


def paired_table(folders) -> Table:
    """Plan against uniform, seed by seed, from sweeps' ``results.csv`` (one folder or several).

    Each budget row is paired with the uniform row of the same algorithm and seed; the uniform bits are the
    budget's own ``uniform:B`` when it names one bit-width B for every limit (and a run with those bits
    exists), else the sweep's only uniform bits. Per pair: ``diff`` = plan - uniform final top-1. Per plan:
    the mean of both, the mean, spread (sample standard deviation) and minimum of ``diff``, ``wins`` (seeds
    where diff > 0, of n), ``worst_drop``: the largest fall, over both plans' runs, from the best validation
    top-1 of an epoch after the activations start to the final one (:func:`late_drop`), and ``per_seed``."""
    rows = _sweep_rows(folders)
    uniform = {(r["algorithm"], r["bits"], r["seed"]): r for r in rows if r["bits"]}
    pairs: dict[tuple, list] = {}
    for row in (r for r in rows if r["budget"]):
        bits = _reference_bits(row, {b for (a, b, _) in uniform if a == row["algorithm"]})
        ref = uniform.get((row["algorithm"], bits, row["seed"]))
        if ref is not None:
            pairs.setdefault((row["algorithm"], row["budget"], bits), []).append((row, ref))
    out = []
    for (algorithm, budget, bits), found in pairs.items():
        found.sort(key=lambda p: int(p[0]["seed"]))
        diffs = [p["final_top1"] - u["final_top1"] for p, u in found]
        n = len(diffs)
        mean = sum(diffs) / n
        std = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else float("nan")
        drops = [r["drop"] for pair in found for r in pair if r["drop"] is not None]
        out.append({"plan": f"{algorithm} proposed, {budget}", "reference": f"{algorithm} W{bits}/A{bits}",
                    "n": n,
                    "plan_top1": sum(p["final_top1"] for p, _ in found) / n,
                    "reference_top1": sum(u["final_top1"] for _, u in found) / n, "diff": mean,
                    "diff_std": std,
                    "diff_min": min(diffs), "wins": f"{sum(d > 0 for d in diffs)}/{n}",
                    "worst_drop": max(drops) if drops else None,
                    "per_seed": "; ".join(f"s{p['seed']}: {p['final_top1']:.2f} vs {u['final_top1']:.2f} "
                                          f"({d:+.2f})" for (p, u), d in zip(found, diffs))})
    return Table(out, PAIRED_COLUMNS, title="proposed vs uniform, same seed: final valid top-1 (%); diff = "
                                            "plan - uniform; worst_drop: best epoch after the activations "
                                            "start - final")


def _sweep_rows(folders) -> list[dict]:
    """The ok rows of each folder's ``results.csv`` with numbers parsed and each run's :func:`late_drop`."""
    rows = []
    for folder in [folders] if isinstance(folders, (str, Path)) else folders:
        path = resolve(folder) / "results.csv"
        if not path.is_file():
            raise FileNotFoundError(f"no sweep results in {path.parent}: run labkit sweep ... -o {folder} "
                                    "first")
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("status") == "ok":
                    run = path.parent / r["run"]
                    rows.append({**r, "seed": int(r["seed"]),
                                 "bits": int(r["bits"]) if r.get("bits") else None,
                                 "final_top1": float(r["final_top1"]), "drop": late_drop(run)})
    return rows


def _reference_bits(row: dict, available: set[int]) -> int | None:
    limits = set(parse_budget(row["budget"]).values())
    if len(limits) == 1:
        (limit,) = limits
        if isinstance(limit, tuple) and limit[0] == limit[1] and limit[0] in available:
            return limit[0]
    return next(iter(available)) if len(available) == 1 else None


def late_drop(run) -> float | None:
    """Best validation top-1 of the epochs from the activations' ``start`` on, minus the final one (None:
    no such run folder or history)."""
    folder = RunFolder(resolve(run))
    history, cfg = folder.history(), folder.config()
    if not history or cfg is None:
        return None
    start = activation_start(cfg)
    late = [r["valid"]["top1"] for r in history if r["epoch"] >= start] or [history[-1]["valid"]["top1"]]
    return max(late) - history[-1]["valid"]["top1"]


def activation_start(cfg: dict) -> int:
    """The first epoch whose schedule starts the activation quantizers (0 when none is scheduled)."""
    quantize = cfg["training"].get("quantize") or {}
    schedules = (quantize.get("kwargs", {}) if "function" in quantize else quantize).get("schedules", {})
    epochs = [int(e) for e, cmds in schedules.get("activation", {}).items()
              if "start" in ([cmds] if isinstance(cmds, str) else cmds)]
    return min(epochs, default=0)
