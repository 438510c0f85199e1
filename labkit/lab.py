"""Notebook-level steps of the lab: notebook parameters -> a config, "make sure this run exists", the
torchvision conversion, and executing notebooks with papermill (the main job, sweeps).

Notebooks call these one at a time and display what they return; the logic lives here and below
(the integer flow of notebook 05: :mod:`labkit.deploy`).
"""

from __future__ import annotations

import csv
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import papermill
import torch
from torch import nn

from labkit.bitwidths import BitPlan
from labkit.build import build_network
from labkit.config import load_config
from labkit.convert import (conversion_error, demo_torchvision_state, from_torchvision, key_table,
                            load_torchvision_weights, save_converted, torchvision_hub_file)
from labkit.data import build_datasets
from labkit.errors import LabkitError
from labkit.paths import resolve
from labkit.report import Table
from labkit.runs import QUANTIZERS, RunFolder, read_history
from labkit.train import evaluate_checkpoint, train

NOTEBOOK_DIR = "notebooks"
MAIN_FLOW = ("02_fp32_check", "03_pact_training", "04_tqt_training", "05_integerize_export")
FP32_CONFIG = "configs/embedded/config.fp32.json"
#: the run folder each notebook of the main flow writes with its default parameters
MAIN_RUNS = {"02_fp32_check": "runs/embedded-fp32", "03_pact_training": "runs/embedded-pact",
             "04_tqt_training": "runs/embedded-tqt"}
#: notebook 05's output folder and the file there with one line per integer twin (``lab_results`` reads it)
INTEGER_DIR, INTEGER_SUMMARY = "runs/integerize", "summary.json"
#: the kernel's own log (a TCP-without-encryption warning at start, a KeyboardInterrupt at shutdown) would land
#: in the executed notebook as stderr; user code's warnings and errors still show
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]
#: the console lines of ``labkit lab`` (without --verbose): a trainer's epoch, resume and skip lines
CONSOLE_LINE = re.compile(r"^(epoch +\d+/\d+|resuming |no checkpoint in |\S+ is complete|\S+ is missing: training|"
                          r"\S+ holds no run: training|\[\w+ controller\])")
#: overrides of a short run (a notebook's stand-in for a missing run): a quarter of the data, no dropout
SHORT_RUN = {"data.train.dataset.limit": 384, "data.valid.dataset.limit": 120, "data.train.dataloader.bs": 32,
             "network.kwargs.dropout": 0.0}


@dataclass
class Conversion:
    """A torchvision -> labkit conversion: where the weights came from, the network, the check, the file."""

    source: str
    demo: bool
    state: dict
    net: nn.Module
    max_diff: float
    checkpoint: Path | None

    def summary(self) -> str:
        net = self.net
        s = (f"{self.source}: {len(self.state)} tensors -> MobileNetV2 capacity {net.capacity}, {net.num_classes} "
             f"classes; max |logit difference| to torchvision's network {self.max_diff:.3g} "
             f"({'identical' if self.max_diff <= 1e-5 else 'DIFFERENT'})")
        if self.checkpoint:
            return s + f"; wrote {self.checkpoint} (use it as network.pretrained)"
        return s + "; a random demo network, so no checkpoint was written (give the real weights file to convert it)"

    def key_table(self, first: int = 12) -> Table:
        table = key_table(self.state)
        return Table(table.rows[:first], title=f"key map: first {first} of {len(table)} tensors")

    def what_we_saw(self) -> "Lines":
        """The conversion's key numbers: tensors, network, the logit check, the file written (or why none)."""
        written = (f"wrote {self.checkpoint}: use it as network.pretrained" if self.checkpoint else
                   "no checkpoint written: the demo network's weights are random (give real weights to convert them)")
        return Lines([f"{len(self.state)} torchvision tensors -> MobileNetV2 capacity {self.net.capacity}, "
                      f"{self.net.num_classes} classes", f"max |logit difference| {self.max_diff:.3g} "
                      f"({'identical' if self.max_diff <= 1e-5 else 'DIFFERENT'}: the bound is 1e-5)", written],
                     f"what we saw: {self.source}")

    def _repr_html_(self) -> str:
        return f"<p>{self.summary()}</p>"

    def __repr__(self) -> str:
        return self.summary()


def convert_torchvision(weights: str | None, output_dir: str | Path) -> Conversion:
    """Convert torchvision weights (``weights``, else the torch hub cache, else a random demo network), check
    the logits against torchvision's own network, and write the checkpoint (real weights only)."""
    demo = weights is None and not torchvision_hub_file().is_file()
    state = demo_torchvision_state() if demo else load_torchvision_weights(weights and resolve(weights))
    net = from_torchvision(state).eval()
    diff = conversion_error(state, net)
    source = "random torchvision mobilenet_v2 (demo)" if demo else str(weights or torchvision_hub_file())
    path = None if demo else save_converted(net, resolve(output_dir) / f"mobilenetv2_{net.capacity}.ckpt", source)
    return Conversion(source, demo, state, net, diff, path)


def evaluate_converted(conversion: Conversion, config: str, data_root: str | None, device: str = "auto") -> str:
    """Top-1 of converted weights on ImageNet (``data_root``), or why it is skipped."""
    if data_root is None:
        return "data_root not set: skipping the ImageNet evaluation"
    if conversion.checkpoint is None:
        return "a random demo network: nothing to evaluate on ImageNet"
    cfg = load_config(config, {"data.root": data_root, "network.pretrained": None})
    m = evaluate_checkpoint(conversion.checkpoint, cfg, device=device, progress=True)
    return f"converted weights: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  ({m['n']} images)"


def describe(cfg: dict) -> str:
    """One line: the network, the data, the schedule of a config."""
    kwargs = cfg["network"]["kwargs"]
    quantized = "PACT/TQT" if cfg["network"].get("quantize") else "FP32"
    return (f"{cfg['name']}: {quantized} MobileNetV2 {kwargs} on '{cfg['data']['name']}', "
            f"{cfg['training']['n_epochs']} epochs, starts from {cfg['network'].get('pretrained') or 'scratch'}")


def run_summary(run: str | Path) -> str:
    """One line about a run folder: epochs, final and best top-1."""
    return RunFolder(resolve(run)).summary()


def what_we_saw(run: str | Path, expect_top1: float | None = None) -> "Lines":
    """A training notebook's conclusion, computed from its run folder: top-1 from the first to the last epoch,
    the FP32 network it started from, time, the bounds that moved most; a warning when the best top-1 is below
    ``expect_top1`` or within twice of chance."""
    folder = RunFolder(resolve(run))
    history = read_history(folder.path)
    if not history:
        return Lines([f"{folder.path} holds no epochs yet"], "what we saw")
    first, last = history[0], history[-1]
    cfg = json.loads(folder.file("config.json").read_text())
    lines = [f"{len(history)} epochs in {sum(r.get('seconds') or 0 for r in history):.0f} s: valid top-1 "
             f"{first['valid']['top1']:.2f}% after epoch 1, {last['valid']['top1']:.2f}% at the end, best "
             f"{last['best_top1']:.2f}%"]
    start = cfg["network"].get("pretrained")
    base = read_history(Path(start).parent) if start and (Path(start).parent / "history.jsonl").is_file() else []
    if base:
        lines.append(f"the FP32 network it started from ({Path(start).parent.name}): best top-1 "
                     f"{base[-1]['best_top1']:.2f}%, so quantization costs "
                     f"{base[-1]['best_top1'] - last['best_top1']:+.2f}"
                     " points (best vs best)")
    if last.get("quant"):
        moved = {n: (first["quant"][n]["hi"], s["hi"]) for n, s in last["quant"].items()
                 if s.get("kind") == "activations" and n in first.get("quant", {})}
        if moved:
            n, (a, b) = max(moved.items(), key=lambda kv: abs(kv[1][1] - kv[1][0]) / max(abs(kv[1][0]), 1e-12))
            lines.append(f"{len(last['quant'])} quantizers; the activation bound that moved most: {n} "
                         f"{a:.3g} -> {b:.3g} (epoch 1 -> {len(history)})")
    chance = 100.0 / cfg["network"]["kwargs"].get("num_classes", 1000)
    if last["best_top1"] <= 2 * chance or (expect_top1 is not None and last["best_top1"] < expect_top1):
        lines.append(f"WARNING: best top-1 {last['best_top1']:.2f}% is a poor baseline (chance {chance:.1f}%"
                     + (f", expected >= {expect_top1:g}%" if expect_top1 is not None else "") + "): train longer "
                     "(epochs) or check the data before quantizing from it")
    return Lines(lines, f"what we saw: {folder.path.name}")


def qat_config(config: str, **parameters) -> dict:
    """:func:`run_config` of a PACT/TQT notebook, with the FP32 checkpoint it starts from made when missing."""
    cfg = run_config(config, **parameters)
    ensure_pretrained(cfg)
    return cfg


def quant_report(cfg: dict, first: int = 8, last: int = 4) -> Table:
    """The recipe's per-layer report of ``cfg``'s network: counts by type, the first and last rows."""
    _, report = build_network(cfg, pretrained=False)
    counts: dict[str, int] = {}
    for row in report:
        counts[row["type"]] = counts.get(row["type"], 0) + 1
    rows = report[:first] + report[-last:]
    return Table(rows, ["name", "type", "source", "bits", "per_channel", "init_clip", "learn_clip", "tqt"],
                 title=f"{cfg['name']}: {', '.join(f'{n} {k}' for k, n in counts.items())}; first {first} and last "
                       f"{last} of {len(report)} quantized layers")


def validation_batch(cfg: dict, n: int = 64) -> torch.Tensor:
    """The first ``n`` validation images of ``cfg``'s dataset, stacked."""
    _, valid = build_datasets(cfg["data"])
    return torch.stack([valid[i][0] for i in range(min(n, len(valid)))])


def train_config(config: str | Path, output_dir: str | Path, epochs: int = 0, device: str = "auto",
                 pretrained: str | None = None) -> str:
    """Train ``config`` for ``epochs`` epochs into ``output_dir`` (continuing a run of the same config there);
    ``epochs`` 0 trains nothing. Returns one line about the run."""
    if not epochs:
        return "epochs = 0: not training (set epochs to train this config)"
    cfg = qat_config(str(config), epochs=epochs, pretrained=pretrained)
    result = train(cfg, resolve(output_dir), resume=True, device=device)
    return f"{cfg['name']}: final valid top-1 {result['valid']['top1']:.2f}% (best {result['best_top1']:.2f}%)"


def run_config(config: str, *, data_root: str | None = None, epochs: int | None = None,
               pretrained: str | None = None, w_bits: int | None = None, a_bits: int | None = None,
               seed: int | None = None, overrides: dict | None = None) -> dict:
    """A notebook's parameters -> resolved config. ``pretrained`` None keeps the config's own.

    ``w_bits`` / ``a_bits`` set every quantized layer's weight / activation bits by editing ``n_levels`` in
    the config's own per-layer entries (:meth:`BitPlan.apply_to`); all other keys stay, and a ``None``
    leaves those bits as the config has them."""
    extra = dict(overrides or {})
    for key, value in (("data.root", data_root), ("training.n_epochs", epochs), ("training.seed", seed)):
        if value is not None:
            extra[key] = value
    if pretrained is not None:
        extra["network.pretrained"] = str(resolve(pretrained))
    cfg = load_config(config, extra, check_files=False)  # ensure_pretrained() makes or reports the checkpoint
    if w_bits is None and a_bits is None:
        return cfg
    plan = BitPlan.from_config(cfg)
    plan.set_all(w_bits, a_bits)
    edited = plan.apply_to(cfg)
    edited["name"] = cfg["name"]
    return edited


def ensure_pretrained(cfg: dict, fp32_config: str = FP32_CONFIG, progress: bool = True) -> str | None:
    """Train the FP32 network that ``cfg`` starts from when its checkpoint is missing (embedded default only)."""
    path = cfg["network"].get("pretrained")
    if not path or Path(path).is_file():
        return path
    if cfg["data"]["name"] != "embedded":
        raise FileNotFoundError(f"network.pretrained '{path}' not found: convert torchvision weights "
                                "(notebook 01 / labkit convert) or train the FP32 network first (notebook 02)")
    folder = Path(path).parent
    print(f"{path} is missing: training the FP32 network first ({fp32_config} into {folder})")
    train(load_config(fp32_config), folder, resume=True, progress=progress)
    return path


def ensure_run(run: str | Path, config: str, fallback_dir: str | Path, epochs: int = 2, device: str = "cpu") -> Path:
    """The run folder ``run`` when it holds a trained run, else a short run of ``config`` (the embedded
    default on a quarter of the data, ``epochs`` epochs) in ``fallback_dir`` (reused when already there)."""
    folder = resolve(run)
    if RunFolder(folder).checkpoint("best").is_file():
        return folder
    target = resolve(fallback_dir)
    if not RunFolder(target).checkpoint("best").is_file():
        print(f"{folder} holds no run: training a short one of {config} into {target}")
        cfg = load_config(config, {**SHORT_RUN, "training.n_epochs": epochs}, check_files=False)
        fp32 = cfg["network"].get("pretrained")
        if fp32 and not Path(fp32).is_file():
            short_fp32 = target.parent / "short-fp32"
            if not RunFolder(short_fp32).checkpoint("best").is_file():
                train(load_config(FP32_CONFIG, {**SHORT_RUN, "training.n_epochs": 6}), short_fp32, resume=True,
                      progress=False, log=None, device=device)
            cfg["network"]["pretrained"] = str(RunFolder(short_fp32).checkpoint("best"))
        train(cfg, target, resume=True, progress=False, log=None, device=device)
    return target


class NotebookError(LabkitError):
    """A notebook of the lab failed; the message names it, the cell, the error and the executed notebook."""


class _Lines:
    """A file-like sink for a kernel's stdout: complete lines that ``keep`` accepts go to ``log``, prefixed."""

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
    trainer's epoch lines (every printed line with ``verbose``) go there as they come, prefixed by ``name``."""
    source = resolve(f"{NOTEBOOK_DIR}/{name}.ipynb", must_exist=True)
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
                                f"{str(err.evalue).splitlines()[0] if err.evalue else ''} (the executed notebook: "
                                f"{target})") from None
    return executed


def lab_results(executed: list[Path]) -> Table:
    """What the main flow produced: each run's top-1 (final and best) and folder, each integer twin's
    agreement with its fake-quant network and export folder (from notebook 05's summary file)."""
    rows = []
    for name, run in MAIN_RUNS.items():
        history = read_history(resolve(run)) if (resolve(run) / "history.jsonl").is_file() else []
        last = history[-1] if history else {}
        rows.append({"step": name, "network": Path(run).name.split("-", 1)[-1].upper(),
                     "top-1 %": last.get("valid", {}).get("top1"), "best %": last.get("best_top1"),
                     "integer agreement": "", "where": str(resolve(run).absolute()) if history else "not run"})
    summary = resolve(INTEGER_DIR) / INTEGER_SUMMARY
    for twin in (json.loads(summary.read_text()) if summary.is_file() else []):
        rows.append({"step": "05_integerize_export", "network": f"{twin['network']} integer",
                     "top-1 %": twin["top1_int"], "best %": None,
                     "integer agreement": f"{twin['predictions']:g}% predictions (fake-quant top-1 "
                                          f"{twin['top1_fake']:.2f}%), worst layer {twin['min_identical']:g}%",
                     "where": twin["export"]})
    notebooks = ", ".join(p.name for p in executed)
    return Table(rows, title=f"labkit lab: results (executed notebooks in {executed[0].parent if executed else '-'}: "
                             f"{notebooks})")


def quantizer_log(run: str | Path, show: int = 0) -> "Collapsed":
    """The run folder's controller log (``quantizers.jsonl``): one row per quantizer and command, collapsed
    under a one-line summary (what the trainer printed as one line per command)."""
    path = RunFolder(resolve(run)).file(QUANTIZERS)
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = [{"epoch": e["epoch"] + 1 if e["epoch"] is not None else None, "controller": e["controller"],
             "command": e["command"], "quantizer": q["name"], "lo": q["lo"], "hi": q["hi"], "eps": q["eps"],
             "levels": q["n_levels"]} for e in events for q in e["quantizers"]]
    what = "; ".join(f"epoch {e['epoch'] + 1 if e['epoch'] is not None else '?'} {e['controller']} {e['command']}"
                     for e in events) or "no controller commands logged"
    return Collapsed(Table(rows, title=f"{path}"), f"quantizer bounds at each controller command ({what})")


def sweep_summary(output_dir: str | Path) -> "Lines":
    """A finished sweep's ``results.csv`` as one line per run (final and best top-1, time) plus the best run."""
    path = resolve(output_dir) / "results.csv"
    if not path.is_file():
        return Lines([f"{path} not found: the sweep has not finished"], "what we saw")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = [f"{r['run']}: final top-1 {float(r['final_top1']):.2f}%, best {float(r['best_top1']):.2f}% "
             f"({float(r['seconds']):.0f} s)" if r in ok else f"{r['run']}: {r.get('status')} ({r.get('error', '')})"
             for r in rows]
    if ok:
        best = max(ok, key=lambda r: float(r["best_top1"]))
        lines.append(f"best: {best['run']} at {float(best['best_top1']):.2f}%; {len(ok)} of {len(rows)} runs finished")
    return Lines(lines, f"what we saw: {path}")


class Collapsed:
    """A table shown closed under a one-line summary (HTML ``<details>``); its text is the summary line only."""

    def __init__(self, table: Table, summary: str):
        self.table, self.summary = table, summary

    def _repr_html_(self) -> str:
        return (f"<details><summary>{html.escape(self.summary)} · {len(self.table)} rows (click to open)</summary>"
                f"{self.table._repr_html_()}</details>")

    def __repr__(self) -> str:
        return f"{self.summary} ({len(self.table)} rows; open the table in JupyterLab)"


class Lines:
    """Lines of text shown as a list (HTML) or one per line (text): the summary a notebook cell opens with."""

    def __init__(self, lines: list[str], title: str = ""):
        self.lines, self.title = lines, title

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.lines)
        return f"<b>{html.escape(self.title)}</b><ul>{items}</ul>" if self.title else f"<ul>{items}</ul>"

    def __repr__(self) -> str:
        return "\n".join(([self.title] if self.title else []) + self.lines)
