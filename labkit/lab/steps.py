"""Notebook-level steps of the lab: notebook parameters -> a config, "make sure this run exists", the
torchvision conversion, and executing notebooks with papermill (the main job, sweeps).

Notebooks call these one at a time and display what they return; the logic lives here and below
(the integer flow of notebook 05: :mod:`labkit.lab.twins`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from labkit.config.loading import load_config
from labkit.config.paths import resolve
from labkit.config.schema import validate
from labkit.config.tables import Table
from labkit.lab.display import Collapsed, Lines
from labkit.lab.twins import Twin, integerize_run
from labkit.precision.bitplan import BitPlan
from labkit.train.build import build_network
from labkit.train.data import build_datasets
from labkit.train.loop import train
from labkit.train.runs import QUANTIZERS, RunFolder, read_history

FP32_CONFIG = "configs/embedded/config.fp32.json"
#: overrides of a short run (a notebook's stand-in for a missing run): a quarter of the data, no dropout
SHORT_RUN = {"data.train.dataset.limit": 384, "data.valid.dataset.limit": 120, "data.train.dataloader.bs": 32,
             "network.kwargs.dropout": 0.0}


def describe(cfg: dict) -> str:
    """One line: the network, the data, the schedule of a config."""
    kwargs = cfg["network"]["kwargs"]
    quantized = "PACT/TQT" if cfg["network"].get("quantize") else "FP32"
    return (f"{cfg['name']}: {quantized} MobileNetV2 {kwargs} on '{cfg['data']['name']}', "
            f"{cfg['training']['n_epochs']} epochs, starts from "
            f"{cfg['network'].get('pretrained') or 'scratch'}")


def run_summary(run: str | Path) -> str:
    """One line about a run folder: epochs, final and best top-1."""
    return RunFolder(resolve(run)).summary()


def what_we_saw(run: str | Path, expect_top1: float | None = None) -> Lines:
    """A training notebook's conclusion, computed from its run folder: top-1 from the first to the last epoch,
    the FP32 network it started from, time, the bounds that moved most; a warning when the best top-1 is below
    ``expect_top1`` or within twice of chance."""
    folder = RunFolder(resolve(run))
    history = read_history(folder.path)
    if not history:
        return Lines([f"{folder.path} holds no epochs yet"], "what we saw")
    first, last = history[0], history[-1]
    cfg = folder.config()
    lines = [f"{len(history)} epochs in {sum(r.get('seconds') or 0 for r in history):.0f} s: valid top-1 "
             f"{first['valid']['top1']:.2f}% after epoch 1, {last['valid']['top1']:.2f}% at the end, best "
             f"{last['best_top1']:.2f}%"]
    start = cfg["network"].get("pretrained")
    base = read_history(Path(start).parent) if start else []
    if base:
        lines.append(f"the FP32 network it started from ({Path(start).parent.name}): best top-1 "
                     f"{base[-1]['best_top1']:.2f}%, so quantization costs "
                     f"{base[-1]['best_top1'] - last['best_top1']:+.2f}"
                     " points (best vs best)")
    if last.get("quant"):
        moved = {n: (first["quant"][n]["hi"], s["hi"]) for n, s in last["quant"].items()
                 if s.get("kind") == "activations" and n in first.get("quant", {})}
        if moved:
            n, (a, b) = max(moved.items(), key=lambda kv: abs(kv[1][1] - kv[1][0]) / max(abs(kv[1][0]),
                                                                                         1e-12))
            lines.append(f"{len(last['quant'])} quantizers; the activation bound that moved most: {n} "
                         f"{a:.3g} -> {b:.3g} (epoch 1 -> {len(history)})")
    chance = 100.0 / validate(cfg).network.kwargs.num_classes
    if last["best_top1"] <= 2 * chance or (expect_top1 is not None and last["best_top1"] < expect_top1):
        lines.append(
            f"WARNING: best top-1 {last['best_top1']:.2f}% is a poor baseline (chance {chance:.1f}%"
            + (f", expected >= {expect_top1:g}%" if expect_top1 is not None else "")
            + "): train longer (epochs) or check the data before quantizing from it"
        )
    return Lines(lines, f"what we saw: {folder.path.name}")


def qat_config(config: str, **parameters) -> dict:
    """:func:`run_config` of a PACT/TQT notebook, with the FP32 checkpoint it starts from made when
    missing."""
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
                 title=f"{cfg['name']}: {', '.join(f'{n} {k}' for k, n in counts.items())}; first {first} "
                       f"and last {last} of {len(report)} quantized layers")


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
    return (
        f"{cfg['name']}: final valid top-1 {result['valid']['top1']:.2f}% (best {result['best_top1']:.2f}%)"
    )


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
    """Train the FP32 network that ``cfg`` starts from when its checkpoint is missing (embedded default
    only)."""
    path = cfg["network"].get("pretrained")
    if not path or Path(path).is_file():
        return path
    if cfg["data"]["name"] != "embedded":
        raise FileNotFoundError(
            f"network.pretrained '{path}' not found: convert torchvision weights "
            "(notebook 01 / labkit convert) or train the FP32 network first (notebook 02)"
        )
    folder = Path(path).parent
    print(f"{path} is missing: training the FP32 network first ({fp32_config} into {folder})")
    train(load_config(fp32_config), folder, resume=True, progress=progress)
    return path


def ensure_run(run: str | Path, config: str, fallback_dir: str | Path, epochs: int = 2,
               device: str = "cpu") -> Path:
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
                train(load_config(FP32_CONFIG, {**SHORT_RUN, "training.n_epochs": 6}), short_fp32,
                      resume=True,
                      progress=False, log=None, device=device)
            cfg["network"]["pretrained"] = str(RunFolder(short_fp32).checkpoint("best"))
        train(cfg, target, resume=True, progress=False, log=None, device=device)
    return target


def quantizer_log(run: str | Path, show: int = 0) -> Collapsed:
    """The run folder's controller log (``quantizers.jsonl``): one row per quantizer and command, collapsed
    under a one-line summary (what the trainer printed as one line per command)."""
    folder = RunFolder(resolve(run))
    events, path = folder.events(), folder.file(QUANTIZERS)
    rows = [{"epoch": e["epoch"] + 1 if e["epoch"] is not None else None, "controller": e["controller"],
             "command": e["command"], "quantizer": q["name"], "lo": q["lo"], "hi": q["hi"], "eps": q["eps"],
             "levels": q["n_levels"]} for e in events for q in e["quantizers"]]
    what = "; ".join(f"epoch {e['epoch'] + 1 if e['epoch'] is not None else '?'} {e['controller']} "
                     f"{e['command']}"
                     for e in events) or "no controller commands logged"
    return Collapsed(Table(rows, title=f"{path}"), f"quantizer bounds at each controller command ({what})")


def sweep_summary(output_dir: str | Path) -> Lines:
    """A finished sweep's ``results.csv`` as one line per run (final and best top-1, time) plus the best
    run."""
    path = resolve(output_dir) / "results.csv"
    if not path.is_file():
        return Lines([f"{path} not found: the sweep has not finished"], "what we saw")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = [f"{r['run']}: final top-1 {float(r['final_top1']):.2f}%, best {float(r['best_top1']):.2f}% "
             f"({float(r['seconds']):.0f} s)" if r in ok else f"{r['run']}: {r.get('status')} "
                                                              f"({r.get('error', '')})"
             for r in rows]
    if ok:
        best = max(ok, key=lambda r: float(r["best_top1"]))
        lines.append(f"best: {best['run']} at {float(best['best_top1']):.2f}%; {len(ok)} of {len(rows)} runs "
                     "finished")
    return Lines(lines, f"what we saw: {path}")


def integer_twins(runs: list[str], fallback_dir: str | Path, *, short_epochs: int = 2, input_bits: int = 8,
          d: int | None = None, device: str = "cpu") -> dict[str, Twin]:
    """The integer twin of each run folder; a missing run is replaced by a short run of its config
    (``runs/<data>-<name>`` -> ``configs/<data>/config.<name>.json``) in ``fallback_dir``."""
    out = {}
    for run in runs:
        data, _, name = resolve(run).name.partition("-")
        folder = ensure_run(run, f"configs/{data}/config.{name}.json",
                            resolve(fallback_dir) / f"short-{name}",
                            short_epochs, device)
        twin = integerize_run(folder, input_bits=input_bits, d=d)
        out[twin.name] = twin
    return out
