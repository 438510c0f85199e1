"""The accuracy-versus-cost view of measured runs: each plan placed by :mod:`labkit.precision.costs`, seeds averaged.

:func:`collect_points` reads run folders (or folders of runs: a sweep's output, ``runs/``), groups the runs
whose configs differ only in ``training.seed`` (one plan, several seeds; a run that has not reached its
``training.n_epochs`` is left out and named in the title), and gives per group the final validation top-1 (mean, worst and best seed) and the plan's ``weight_bytes``, ``act_bytes`` and ``BOPs``
(:meth:`labkit.precision.bitplan.BitPlan.totals`). Kinds: ``fp32``; ``uniform`` (one weight and one activation
bit-width everywhere); ``proposed`` (a config written by :mod:`labkit.precision.allocate`); ``mixed`` (any other
per-layer plan, e.g. from the bit-width editor). :func:`labkit.lab.plots.plot_pareto` draws them.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.precision.bitplan import INPUT, BitPlan
from labkit.train.runs import CONFIG, HISTORY, RunFolder, config_hash

COLUMNS = ("label", "kind", "n", "top1", "top1_min", "top1_max", "seeds", "weight_bytes", "act_bytes", "BOPs", "runs")
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
    """One row per plan (runs that differ only in seed), columns :data:`COLUMNS` (see the module docstring)."""
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
                     "top1_max": max(top1s), "seeds": " ".join(map(str, g["seeds"])), "runs": " ".join(g["runs"])})
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
