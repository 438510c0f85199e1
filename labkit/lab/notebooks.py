"""Notebooks run in batch: papermill executes them from their own folder, the console gets the trainer's
lines."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import papermill

from labkit.config.errors import LabkitError
from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.lab.twins import INTEGER_DIR, INTEGER_SUMMARY
from labkit.train.runs import read_history

NOTEBOOK_DIR = "notebooks"


MAIN_FLOW = ("02_fp32_check", "03_pact_training", "04_tqt_training", "05_integerize_export")


#: the run folder each notebook of the main flow writes with its default parameters
MAIN_RUNS = {"02_fp32_check": "runs/embedded-fp32", "03_pact_training": "runs/embedded-pact",
             "04_tqt_training": "runs/embedded-tqt"}


#: the kernel's own log (a TCP-without-encryption warning at start, a KeyboardInterrupt at shutdown) would
#: land in the executed notebook as stderr; user code's warnings and errors still show
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]


#: the console lines of ``labkit lab`` (without --verbose): a trainer's epoch, resume and skip lines
CONSOLE_LINE = re.compile(r"^(epoch +\d+/\d+|resuming |no checkpoint in |\S+ is complete|\S+ is missing: "
                          r"training|"
                          r"\S+ holds no run: training|\[\w+ controller\])")


class NotebookError(LabkitError):
    """A notebook of the lab failed; the message names it, the cell, the error and the executed notebook."""


class _Lines:
    """A file-like sink for a kernel's stdout: complete lines that ``keep`` accepts go to ``log``,
    prefixed."""

    def __init__(self, log: Callable[[str], None], prefix: str, keep: Callable[[str], bool]):
        self.log, self.prefix, self.keep, self.rest = log, prefix, keep, ""

    def write(self, text: str) -> None:
        *lines, self.rest = (self.rest + text).split("\n")
        for line in lines:
            if line.strip() and self.keep(line):
                self.log(f"{self.prefix}{line}")

    def flush(self) -> None:
        pass


def execute_notebook(name: str, target: str | Path, parameters: dict[str, Any] | None = None,
                     log: Callable[[str], None] | None = None, verbose: bool = False) -> Path:
    """Run ``notebooks/<name>.ipynb`` top to bottom with papermill into ``target`` (from its own folder, so
    relative paths in it work); a failing cell raises ``papermill.PapermillExecutionError``. With ``log``, the
    trainer's epoch lines (every printed line with ``verbose``) go there as they come, prefixed by
    ``name``."""
    source = resolve(f"{NOTEBOOK_DIR}/{name}.ipynb")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    keep = (lambda line: True) if verbose else (lambda line: bool(CONSOLE_LINE.match(line.strip())))
    papermill.execute_notebook(str(source), str(target), parameters=parameters or {}, cwd=str(source.parent),
                               progress_bar=False, kernel_name="python3", extra_arguments=KERNEL_ARGS,
                               stdout_file=_Lines(log, f"  {name}  ", keep) if log else None)
    return target


def run_notebooks(output_dir: str = "runs/lab", names=MAIN_FLOW, parameters: dict | None = None,
                  log=print, verbose: bool = False) -> list[Path]:
    """Execute notebooks in order with papermill into ``output_dir`` (each writes its runs below it); one
    line per notebook and per training epoch in ``log``."""
    out = resolve(output_dir)
    executed = []
    for name in names:
        target = out / f"{name}.ipynb"
        log(f"{name}.ipynb -> {target}")
        try:
            executed.append(execute_notebook(name, target, (parameters or {}).get(name, {}), log, verbose))
        except papermill.PapermillExecutionError as err:
            raise NotebookError(f"{name}.ipynb failed in cell {err.exec_count}: {err.ename}: "
                                f"{str(err.evalue).splitlines()[0] if err.evalue else ''} (the executed "
                                f"notebook: {target})") from None
    return executed


def lab_results(executed: list[Path]) -> Table:
    """What the main flow produced: each run's top-1 (final and best) and folder, each integer twin's
    agreement with its fake-quant network and export folder (from notebook 05's summary file)."""
    rows = []
    for name, run in MAIN_RUNS.items():
        history = read_history(resolve(run))
        last = history[-1] if history else {}
        rows.append({"step": name, "network": Path(run).name.split("-", 1)[-1].upper(),
                     "top-1 %": last.get("valid", {}).get("top1"), "best %": last.get("best_top1"),
                     "integer agreement": "",
                     "where": str(resolve(run).absolute()) if history else "not run"})
    summary = resolve(INTEGER_DIR) / INTEGER_SUMMARY
    for twin in (json.loads(summary.read_text()) if summary.is_file() else []):
        rows.append(
            {
                "step": "05_integerize_export",
                "network": f"{twin['network']} integer",
                "top-1 %": twin["top1_int"],
                "best %": None,
                "integer agreement": (
                    f"{twin['predictions']:g}% predictions (fake-quant top-1 "
                    f"{twin['top1_fake']:.2f}%), worst layer {twin['min_identical']:g}%"
                ),
                "where": twin["export"],
            }
        )
    notebooks = ", ".join(p.name for p in executed)
    return Table(rows, title="labkit lab: results (executed notebooks in "
                             f"{executed[0].parent if executed else '-'}: {notebooks})")
