"""Notebook-level steps of the lab: notebook parameters -> a config, "make sure this run exists", the
torchvision conversion, and executing notebooks with papermill (the main job, sweeps).

Notebooks call these one at a time and display what they return; the logic lives here and below
(the integer flow of notebook 05: :mod:`labkit.deploy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import papermill
import torch
from torch import nn

from labkit.bitwidths import BitPlan
from labkit.build import build_network
from labkit.config import load_config
from labkit.convert import (conversion_error, demo_torchvision_state, from_torchvision, key_table,
                            load_torchvision_weights, save_converted, torchvision_hub_file)
from labkit.data import build_datasets
from labkit.paths import resolve
from labkit.report import Table
from labkit.runs import RunFolder
from labkit.train import evaluate_checkpoint, train

NOTEBOOK_DIR = "notebooks"
MAIN_FLOW = ("02_fp32_check", "03_pact_training", "04_tqt_training", "05_integerize_export")
FP32_CONFIG = "configs/embedded/config.fp32.json"
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


def execute_notebook(name: str, target: str | Path, parameters: dict[str, Any] | None = None) -> Path:
    """Run ``notebooks/<name>.ipynb`` top to bottom with papermill into ``target`` (from its own folder, so
    relative paths in it work); a failing cell raises ``papermill.PapermillExecutionError``."""
    source = resolve(f"{NOTEBOOK_DIR}/{name}.ipynb", must_exist=True)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(source), str(target), parameters=parameters or {}, cwd=str(source.parent),
                               progress_bar=False, kernel_name="python3")
    return target


def run_notebooks(output_dir: str = "runs/lab", names=MAIN_FLOW, parameters: dict | None = None,
                  log=print) -> list[Path]:
    """Execute notebooks in order with papermill into ``output_dir`` (each writes its runs below it)."""
    out = resolve(output_dir)
    executed = []
    for name in names:
        target = out / f"{name}.ipynb"
        log(f"running {name}.ipynb -> {target}")
        executed.append(execute_notebook(name, target, (parameters or {}).get(name, {})))
    return executed
