"""TensorBoard events in the run folder, written from the same per-epoch records as ``history.jsonl``.

``tensorboard --logdir runs/`` then shows every run folder below ``runs/`` as one run (a sweep: one per
point). ``history.jsonl`` stays the source of truth; the events are a view of it.

* **Step** = epochs finished: the record of epoch ``e`` (0-based, printed as "epoch e+1") is step ``e + 1``.
* **Scalars** per record (:func:`record_scalars`): ``loss/train``, ``loss/valid``, ``top1/*``, ``top5/*``,
  ``lr``, ``best_top1``, ``seconds``; per quantizer ``q`` of layer group ``G`` (:func:`layer_group`, e.g.
  ``features.3``) ``quant.G/q/lo``, ``hi``, ``eps``, ``log2_t`` (TQT) and, per channel, ``hi_min`` ...
  ``lo_max``. The custom scalars dashboard gets one chart per group and quantity, a line per quantizer.
* **Histograms** of every conv/linear weight and of the input of every activation quantizer (a ReLU/ReLU6 in
  a float network) on the first validation images: at step ``e`` for the quantizers a controller starts before
  epoch ``e`` (step 0 for a float network), and at step ``n_epochs`` after the last epoch.
* **Resume.** A session that starts at epoch ``k`` opens its writer with ``purge_step=k`` (TensorBoard hides
  what an interrupted session wrote from step ``k`` on), then first writes the scalars of every history record
  the folder's events lack (an epoch whose events were lost by a kill between its checkpoint and the flush),
  so that every step's scalars are exactly ``history.jsonl``'s, as float32. A new run (``k = 0``) removes the
  event files of a run the folder held before. Events are flushed after every epoch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from labkit.quant import PACTConv2d, PACTLinear
from labkit.quant.base import quantizers
from labkit.train.runs import RunFolder

EVENTS_GLOB = "events.out.tfevents.*"
#: the record's quantizer entries written as scalars (n_levels and kind are not curves)
QUANT_KEYS = ("lo", "hi", "eps", "log2_t", "hi_min", "hi_max", "lo_min", "lo_max")
METRICS = ("loss", "top1", "top5")
#: validation images whose activations are histogrammed
HISTOGRAM_IMAGES = 16
#: equal-width buckets between a tensor's min and max (numpy's fast path; TensorBoard's default ~1,500
#: exponential edges make numpy sort every tensor, ~6x slower)
HISTOGRAM_BINS = 64
#: any one tag present in every record's events: the steps it holds are the epochs the events cover
PROBE_TAG = "lr"


def layer_group(name: str) -> str:
    """``features.3.residual_branch.1.2`` -> ``features.3``; ``pilot.2`` -> ``pilot``; ``classifier.1`` ->
    ``classifier``: the numbered block a module lies inside, else its top-level module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def quant_tag(name: str, key: str) -> str:
    return f"quant.{layer_group(name)}/{name}/{key}"


def record_scalars(record: dict) -> dict[str, float]:
    """``{tag: value}`` of one history record (module docstring); non-finite and missing values left out."""
    out = {f"{m}/{split}": record[split][m] for split in ("train", "valid") for m in METRICS
           if m in record.get(split, {})}
    out.update({k: record[k] for k in ("lr", "best_top1", "seconds") if record.get(k) is not None})
    for name, state in (record.get("quant") or {}).items():
        out.update({quant_tag(name, k): state[k] for k in QUANT_KEYS if k in state})
    return {tag: float(v) for tag, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def scalar_layout(record: dict) -> dict:
    """Custom-scalars layout: per layer group, a multi-line chart per quantity over the group's quantizers."""
    layout: dict[str, dict] = {}
    for name, state in (record.get("quant") or {}).items():
        group = layout.setdefault(f"quant.{layer_group(name)}", {})
        for key in QUANT_KEYS:
            if key in state:
                group[key] = ["Multiline", [rf"^quant\.{re.escape(layer_group(name))}/.*/{key}$"]]
    return layout


def logged_steps(folder: str | Path, tag: str = PROBE_TAG) -> set[int]:
    """The steps of ``tag`` in the folder's events as TensorBoard shows them (after its purges)."""
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    return {e.step for e in acc.Scalars(tag)} if tag in acc.Tags()[SCALARS] else set()


class TensorBoardLog:
    """A training callback (``train(..., callbacks=[...])``) that writes a run folder's TensorBoard events.

    ``on_epoch_start(epoch)`` (after the controllers' commands of that epoch) opens the writer in the
    session's first epoch and writes the start histograms; ``__call__(record)`` writes the record's scalars
    after its epoch is saved (and the end histograms after the last epoch); :meth:`close` ends the session's
    file.
    """

    def __init__(self, folder: str | Path, net: nn.Module, controllers, val_loader, device: torch.device,
                 n_epochs: int):
        self.folder = Path(folder)
        self.net, self.controllers, self.val_loader = net, list(controllers), val_loader
        self.device, self.n_epochs = device, n_epochs
        self.writer: SummaryWriter | None = None
        self.layout_written = False

    def on_epoch_start(self, epoch: int) -> None:
        if self.writer is None:
            self._open(epoch)
        starting = self._starting(epoch)
        if starting is None or starting:
            self.histograms(epoch, starting)
            self.writer.flush()

    def __call__(self, record: dict) -> None:
        if self.writer is None:
            self._open(int(record["epoch"]))
        self._write_scalars(record)
        if record["epoch"] + 1 >= self.n_epochs:
            self.histograms(self.n_epochs, None)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ------------------------------------------------------------------ writing
    def _open(self, start: int) -> None:
        """The session's writer from epoch ``start`` on: stale events hidden, lost epochs written again."""
        if start == 0:
            for old in self.folder.glob(EVENTS_GLOB):
                old.unlink()
        have = {s for s in logged_steps(self.folder) if s < start} if start else set()
        self.writer = SummaryWriter(str(self.folder), purge_step=start)
        for record in RunFolder(self.folder).history():
            if record["epoch"] < start and record["epoch"] + 1 not in have:
                self._write_scalars(record)

    def _write_scalars(self, record: dict) -> None:
        step = int(record["epoch"]) + 1
        if not self.layout_written and record.get("quant"):
            self.writer.add_custom_scalars(scalar_layout(record))
            self.layout_written = True
        for tag, value in record_scalars(record).items():
            self.writer.add_scalar(tag, value, step, new_style=False)

    def _starting(self, epoch: int) -> set[str] | None:
        """Names of the quantizers a controller starts at ``epoch``; None (every module) for a float network's
        first epoch; an empty set otherwise."""
        if not self.controllers:
            return None if epoch == 0 else set()
        return {name for c in self.controllers if "start" in c.schedule.get(epoch, [])
                for name, _ in c.modules}

    @torch.no_grad()
    def histograms(self, step: int, names: set[str] | None) -> None:
        """Weights and activation-quantizer inputs of ``names`` (None: every one) at ``step``; the network's
        mode and every RNG are left as they were (nothing here changes training)."""
        weights, acts = histogram_targets(self.net)
        for name, module in weights.items():
            if names is None or name in names:
                self.writer.add_histogram(f"weights/{name}", module.weight.detach().float().cpu(), step,
                                          bins=HISTOGRAM_BINS)
        wanted = {n: m for n, m in acts.items() if names is None or n in names}
        if not wanted:
            return
        hooks = [m.register_forward_pre_hook(self._activation_hook(n, step)) for n, m in wanted.items()]
        was_training = self.net.training
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                x, _ = next(iter(self.val_loader))
            self.net.eval()
            self.net(x[:HISTOGRAM_IMAGES].to(self.device))
        finally:
            self.net.train(was_training)
            for h in hooks:
                h.remove()

    def _activation_hook(self, name: str, step: int):
        def hook(_module, inputs):
            self.writer.add_histogram(f"activations/{name}", inputs[0].detach().float().cpu(), step,
                                      bins=HISTOGRAM_BINS)
        return hook


def histogram_targets(net: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(weight layers, activation modules)`` by name: conv/linear layers; activation quantizers (ReLU and
    ReLU6 modules in a float network)."""
    layers = (nn.Conv2d, nn.Linear, PACTConv2d, PACTLinear)
    weights = {n: m for n, m in net.named_modules() if isinstance(m, layers)}
    acts = {n: m for n, m in quantizers(net) if n not in weights}
    if not acts:
        acts = {n: m for n, m in net.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))}
    return weights, acts
