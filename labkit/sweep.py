"""Sweeps: run the training notebook once per grid point through papermill and gather a results table.

A grid is ``{"algorithm": [...], "bits": [...], "seed": [...]}``; each point runs
``notebooks/03_pact_training.ipynb`` with ``config = configs/<data>/config.<algorithm>.json``, ``w_bits =
a_bits = bits``, ``seed`` and ``epochs``. Every executed notebook is kept. A failing run is recorded with its
notebook, cell and error; the others go on.
"""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path

from matplotlib.figure import Figure
from papermill.exceptions import PapermillExecutionError

from labkit.lab import execute_notebook
from labkit.paths import resolve
from labkit.report import Table
from labkit.runs import read_history

TRAINING_NOTEBOOK = "03_pact_training"
GRID_KEYS = ("algorithm", "bits", "seed")
COLUMNS = ("run", "algorithm", "bits", "seed", "status", "final_top1", "best_top1", "epochs", "seconds", "notebook",
           "error")


def expand_grid(grid: dict) -> list[dict]:
    """``{"algorithm": ["pact", "tqt"], "bits": [8], "seed": [0, 1]}`` -> one dict per combination."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown sweep key(s) {sorted(unknown)}: a grid has {', '.join(GRID_KEYS)}")
    values = {k: grid.get(k) if isinstance(grid.get(k), list) else [grid[k]] for k in GRID_KEYS if k in grid}
    for key in ("algorithm", "bits"):
        if not values.get(key):
            raise ValueError(f"the sweep grid needs at least one '{key}'")
    values.setdefault("seed", [0])
    for bits in values["bits"]:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"sweep bits {bits!r}: use integers from 2 to 16")
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def run_name(point: dict) -> str:
    return f"{point['algorithm']}-w{point['bits']}a{point['bits']}-s{point['seed']}"


def run_sweep(grid: dict, output_dir: str | Path = "runs/sweep", *, epochs: int = 2, data: str = "embedded",
              data_root: str | None = None, device: str = "auto", pretrained: str | None = None,
              notebook: str = TRAINING_NOTEBOOK, log=print) -> Table:
    """Run every grid point; write ``results.csv`` and ``results.png`` into ``output_dir``; return the table.

    ``pretrained`` None: each config's own ``network.pretrained``."""
    out = resolve(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in expand_grid(grid):
        name = run_name(point)
        config = resolve(f"configs/{data}/config.{point['algorithm']}.json", must_exist=True)
        executed = out / f"{name}.ipynb"
        run_dir = out / name
        parameters = {"config": str(config), "w_bits": point["bits"], "a_bits": point["bits"], "seed": point["seed"],
                      "epochs": epochs, "output_dir": str(run_dir), "device": device, "data_root": data_root,
                      "pretrained": str(resolve(pretrained)) if pretrained else None}
        row = {"run": name, **point, "notebook": str(executed), "epochs": epochs}
        log(f"[sweep] {name}: running {notebook}.ipynb -> {executed}")
        t0 = time.perf_counter()
        try:
            if not config.is_file():
                raise FileNotFoundError(f"no config {config} for algorithm '{point['algorithm']}'")
            execute_notebook(notebook, executed, parameters)
            history = read_history(run_dir)
            if not history:
                raise RuntimeError(f"the notebook ran but wrote no history in {run_dir}")
            row.update(status="ok", final_top1=history[-1]["valid"]["top1"], best_top1=history[-1]["best_top1"])
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
    return table


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
