"""Sweeps: run the training notebook once per grid point through papermill and gather a results table.

A grid is ``{"algorithm": [...], "bits": [...], "budget": [...], "seed": [...]}``; each point runs
the algorithm's training notebook (``04_tqt_training`` for ``tqt*``, else ``03_pact_training``) with ``seed``, ``epochs`` and a config built from
``configs/<data>/config.<algorithm>.json``: for a ``bits`` point that config with ``w_bits = a_bits = bits``
(every layer); for a ``budget`` point (:func:`labkit.config.budget.parse_budget`, e.g.
``"weight_bytes=uniform:3,BOPs=uniform:3"``) the plan :func:`labkit.precision.allocate.propose` finds for that budget
(sensitivity of the config's ``network.pretrained`` checkpoint, cached beside it), written as
``plans/<algorithm>-<budget>.json`` in the sweep folder. Every executed notebook is kept; each row carries
the plan's weight bytes, activation bytes and BOPs. With budgets and bits in one grid, ``paired.csv`` pairs each
budget plan with the uniform run of the same seed (:func:`labkit.precision.pareto.paired_table`). A failing run is recorded with its notebook, cell and
error; the others go on.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from matplotlib.figure import Figure
from papermill.exceptions import PapermillExecutionError

from labkit.config.budget import budget_slug, format_budget, parse_budget
from labkit.config.errors import LabkitError
from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.lab.notebooks import execute_notebook
from labkit.lab.steps import ensure_pretrained, run_config
from labkit.precision.allocate import propose
from labkit.precision.pareto import describe_plan, paired_table
from labkit.precision.sensitivity import DEFAULT_BITS
from labkit.train.runs import RunFolder, read_history

TRAINING_NOTEBOOK = "03_pact_training"
TQT_NOTEBOOK = "04_tqt_training"
GRID_KEYS = ("algorithm", "bits", "budget", "seed")
class SweepError(LabkitError, ValueError):
    """A sweep grid that cannot run (unknown key, no algorithm, impossible bits, no config for an algorithm)."""


COST_COLUMNS = ("weight_bytes", "act_bytes", "BOPs")
COLUMNS = ("run", "algorithm", "bits", "budget", "seed", "status", "final_top1", "best_top1", *COST_COLUMNS, "epochs",
           "seconds", "notebook", "config", "error")


def expand_grid(grid: dict) -> list[dict]:
    """``{"algorithm": ["pact", "tqt"], "bits": [8], "budget": ["BOPs=uniform:3"], "seed": [0, 1]}`` -> one
    dict per combination of algorithm, seed and either bits or budget (budgets in canonical spelling)."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {sorted(unknown)}: a grid has {', '.join(GRID_KEYS)}")
    values = {k: grid.get(k) if isinstance(grid.get(k), list) else [grid[k]] for k in GRID_KEYS if k in grid}
    if not values.get("algorithm"):
        raise SweepError("the sweep grid needs at least one 'algorithm'")
    if not values.get("bits") and not values.get("budget"):
        raise SweepError("the sweep grid needs at least one 'bits' (or 'budget')")
    for bits in values.get("bits", []):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise SweepError(f"sweep bits {bits!r}: use integers from 2 to 16")
    plans = [("bits", b) for b in values.get("bits", [])] + \
        [("budget", format_budget(parse_budget(b))) for b in values.get("budget", [])]
    return [{"algorithm": alg, key: value, "seed": seed}
            for alg in values["algorithm"] for key, value in plans for seed in values.get("seed", [0])]


def algorithm_config(algorithm: str, data: str = "embedded") -> Path:
    """``configs/<data>/config.<algorithm>.json``; a :class:`SweepError` naming the algorithms there otherwise."""
    config = resolve(f"configs/{data}/config.{algorithm}.json", must_exist=True).absolute()
    if not config.is_file():
        known = sorted(p.name[len("config."):-len(".json")] for p in config.parent.glob("config.*.json"))
        raise SweepError(f"no config {config} for sweep algorithm '{algorithm}': choose one of {', '.join(known)} "
                         f"(or add configs/{data}/config.{algorithm}.json)")
    return config


def training_notebook(algorithm: str) -> str:
    """The notebook that trains ``algorithm``'s config: TQT's for ``tqt*``, PACT's otherwise."""
    return TQT_NOTEBOOK if algorithm.startswith("tqt") else TRAINING_NOTEBOOK


def run_name(point: dict) -> str:
    if "budget" in point:
        return f"{point['algorithm']}-{budget_slug(parse_budget(point['budget']))}-s{point['seed']}"
    return f"{point['algorithm']}-w{point['bits']}a{point['bits']}-s{point['seed']}"


def run_sweep(grid: dict, output_dir: str | Path = "runs/sweep", *, epochs: int = 2, data: str = "embedded",
              data_root: str | None = None, device: str = "auto", pretrained: str | None = None,
              notebook: str | None = None, plan_bits=DEFAULT_BITS, calib: int = 256, log=print) -> Table:
    """Run every grid point; write ``results.csv`` and ``results.png`` into ``output_dir``; return the table.

    ``pretrained`` None: each config's own ``network.pretrained``. Budget points choose among ``plan_bits``
    (weights and activations) with a sensitivity measured on ``calib`` training images."""
    points = expand_grid(grid)
    configs = {p["algorithm"]: algorithm_config(p["algorithm"], data) for p in points}  # all found before any run
    out = resolve(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans: dict[tuple, Path] = {}
    rows = []
    for point in points:
        name = run_name(point)
        config = configs[point["algorithm"]]
        executed = out / f"{name}.ipynb"
        run_dir = out / name
        bits = point.get("bits")
        parameters = {"config": str(config), "w_bits": bits, "a_bits": bits, "seed": point["seed"], "epochs": epochs,
                      "output_dir": str(run_dir), "device": device, "data_root": data_root,
                      "pretrained": str(resolve(pretrained)) if pretrained else None}
        row = {"run": name, **point, "notebook": str(executed), "epochs": epochs, "config": str(config)}
        source = notebook or training_notebook(point["algorithm"])
        log(f"[sweep] {name}: running {source}.ipynb -> {executed}")
        t0 = time.perf_counter()
        try:
            if "budget" in point:
                key = (point["algorithm"], point["budget"])
                if key not in plans:
                    plans[key] = _propose(config, point, out / "plans", data_root, pretrained, plan_bits, calib, log)
                parameters["config"] = row["config"] = str(plans[key])
            execute_notebook(source, executed, parameters, log=log)  # one console line per epoch
            history = read_history(run_dir)
            if not history:
                raise RuntimeError(f"the notebook ran but wrote no history in {run_dir}")
            row.update(status="ok", final_top1=history[-1]["valid"]["top1"], best_top1=history[-1]["best_top1"])
            costs = describe_plan(RunFolder(run_dir).config())
            row.update({k: costs[k] for k in COST_COLUMNS})
        except PapermillExecutionError as err:
            row.update(status="failed", error=f"cell {err.exec_count}: {err.ename}: {err.evalue}")
        except Exception as err:  # a run that could not even start; the sweep goes on
            row.update(status="failed", error=f"{type(err).__name__}: {err}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"[sweep] {name}: {row['status']}" + (f" top-1 {row['final_top1']:.2f}%" if row["status"] == "ok"
                                                 else f" ({row['error']}; see {executed})"))
        rows.append(row)
    table = Table(rows, COLUMNS, title=f"sweep: {len(rows)} runs, {sum(r['status'] == 'ok' for r in rows)} ok")
    table.to_csv(out / "results.csv")
    _plot(rows, out / "results.png")
    paired = paired_table(out)  # budget plans against the uniform run of the same seed
    if paired.rows:
        paired.to_csv(out / "paired.csv")
        log(str(paired))
    return table


def _propose(config: Path, point: dict, folder: Path, data_root, pretrained, plan_bits, calib, log) -> Path:
    """The proposed plan of ``point``'s budget for ``config``, saved as ``<folder>/<algorithm>-<budget>.json``."""
    cfg = run_config(str(config), data_root=data_root, pretrained=pretrained)
    ensure_pretrained(cfg)  # the embedded FP32 run is trained first when missing
    allocation = propose(cfg, point["budget"], bits=plan_bits, n_calib=calib)
    path = allocation.save(folder / f"{point['algorithm']}-{budget_slug(parse_budget(point['budget']))}.json")
    log(f"[sweep] {allocation.summary()} -> {path}")
    return path


def results_figure(output_dir: str | Path) -> Figure:
    """The bar chart of a finished sweep's ``results.csv`` (final top-1 per run; failed runs in the title)."""
    path = resolve(output_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no sweep results in {path.parent}: run the sweep first (labkit sweep ... -o {output_dir})")
    with open(path, newline="") as f:
        rows = [dict(r, final_top1=float(r["final_top1"] or "nan")) for r in csv.DictReader(f)]
    return _figure(rows)


def _plot(rows: list[dict], path: Path) -> None:
    _figure(rows).savefig(path, dpi=100)


def _figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(max(4, 1.1 * len(rows) + 2), 3.5))
    ax = fig.subplots()
    ok = [r for r in rows if r["status"] == "ok"]
    bars = ax.bar([r["run"] for r in ok], [r["final_top1"] for r in ok], color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f")
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    ax.set(ylabel="final valid top-1 (%)", title="sweep" + (f" (failed: {', '.join(failed)})" if failed else ""))
    ax.set_ylim(0, 105)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
