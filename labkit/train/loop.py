"""The training loop, in the spirit of torchvision's ``references/classification``: set up, restore, then per
epoch train, evaluate, save.

Networks come from :mod:`labkit.train.build`, the run folder (config, provenance, history, atomic checkpoints,
lock) is :mod:`labkit.train.runs`. Per batch: controllers step, forward (AMP on CUDA), backward, unscale, TQT
``log2 t`` gradient normalisation (:func:`labkit.quant.normalize_tqt_grads`, once per optimizer step),
optimizer step, weight average (``training.ema``, :mod:`labkit.train.ema`: the average is then what is
validated and checkpointed). A resumed run reaches the same weights as an uninterrupted one: every epoch
reseeds the RNGs from ``(seed, epoch)``. A non-finite loss or validation metric stops the run with
:class:`NonFiniteError` naming the epoch, the batch and the first module whose output turned non-finite;
nothing of that epoch is written.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labkit.config.errors import LabkitError
from labkit.config.schema import RunConfig, validate
from labkit.quant import PACTConv2d, PACTLinear, normalize_tqt_grads, quant_summaries, tqt_modules
from labkit.train.build import build_controllers, build_network
from labkit.train.checkpoint import make_checkpoint
from labkit.train.data import build_datasets, check_num_classes, fingerprint
from labkit.train.distributed import all_reduce_sum, convert_sync_batchnorm, init_from_env, shutdown
from labkit.train.ema import WeightEMA
from labkit.train.evaluate import autocast, evaluate, resolve_device, summarise, to_device, topk_correct
from labkit.train.gd import build_optimizer, build_scheduler
from labkit.train.loaders import make_train_loader, make_val_loader
from labkit.train.progress import progress as progress_bar
from labkit.train.runs import QUANTIZERS, RunFolder, open_for_training, provenance_entry
from labkit.train.tensorboard import TensorBoardLog

__all__ = ["train", "train_one_epoch", "NonFiniteError", "quant_state", "TRAINED_WEIGHTS"]

#: checkpoint key of the trained weights when ``state_dict`` holds their average (``training.ema``)
TRAINED_WEIGHTS = "trained_state_dict"


class NonFiniteError(LabkitError, FloatingPointError):
    """The loss or a metric became inf/NaN; the message names the epoch, batch and first non-finite module."""


@dataclass
class Session:
    """One training session: the config, where it runs, and everything built from them."""

    cfg: dict
    rc: RunConfig
    run: RunFolder
    device: torch.device
    rank: int = 0
    world: int = 1
    say: Callable[[str], None] = print
    progress: bool = True
    callbacks: tuple = ()
    net: nn.Module = None
    model: nn.Module = None  # net, or its DistributedDataParallel wrapper
    controllers: list = field(default_factory=list)
    train_loader: torch.utils.data.DataLoader = None
    val_loader: torch.utils.data.DataLoader = None
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    per_batch: bool = False
    scaler: torch.amp.GradScaler = None
    criterion: nn.Module = None
    data_hash: str = ""
    ema: WeightEMA | None = None  # training.ema
    evaluated: nn.Module = None  # the network validated and checkpointed: net, or its weight average
    # written with the session's first finished epoch (a start killed at once leaves none)
    provenance: dict | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.rc.training.amp


def train(cfg: dict, output_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          device: str = "auto",
          progress: bool = True, callbacks: Iterable[Callable[[dict], None]] = (),
          log: Callable[[str], None] | None = print, parameters: dict | None = None, verbose: bool = False,
          tensorboard: bool = True) -> dict:
    """Train ``cfg`` (a resolved config) into the run folder ``output_dir``; returns the final record plus
    ``best_top1`` and ``run_dir``.

    A folder that already holds a run needs ``resume`` (same config; a longer ``n_epochs`` where the schedule
    allows) or ``overwrite`` (see :func:`labkit.train.runs.open_for_training`). ``callbacks`` get each epoch's
    history record (notebooks draw live plots from them); one with an ``on_batch`` method also gets, after
    every training batch, ``{"epoch", "batch", "batches", "train", "quant": () -> quant_state(net)}``, one
    with ``on_epoch_start`` each epoch's index after its controller commands, before training. Controller
    commands are one line each in ``log``; every quantizer's bounds go to the run folder's
    ``quantizers.jsonl`` (and to ``log`` with ``verbose``). ``parameters``: the notebook parameters to record
    as the run's provenance (default: the command line). Under ``torchrun`` the process group is joined here
    and left at the end. ``tensorboard``: also write TensorBoard events (:mod:`labkit.train.tensorboard`,
    after ``callbacks``).
    """
    dev = resolve_device(device)
    rank, world, local_rank, created = init_from_env(dev.type)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    say = log if rank == 0 and log else (lambda _msg: None)
    s = Session(cfg, validate(cfg), RunFolder(output_dir), dev, rank, world, say, progress and rank == 0,
                tuple(callbacks))
    clean, events = False, None
    try:
        build(s, verbose)  # everything is built (and so checked) before anything is written
        if tensorboard and s.main:
            events = TensorBoardLog(s.run.path, s.net, s.controllers, s.val_loader, s.device,
                                    s.rc.training.n_epochs)
            s.callbacks += (events,)
        with s.run.writing() if s.main else nullcontext(s.run):
            start, best, history = restore(s, resume, overwrite, parameters)
            s.model = s.net if s.world == 1 else nn.parallel.DistributedDataParallel(
                s.net, device_ids=[s.device.index] if s.device.type == "cuda" else None,
                find_unused_parameters=bool(s.controllers))
            record = history[-1] if history else {}
            for epoch in range(start, s.rc.training.n_epochs):
                record = run_epoch(s, epoch, best)
                best = record["best_top1"]
                history.append(record)
                save(s, history)
        clean = True
        return {**record, "best_top1": best, "run_dir": str(s.run.path)}
    finally:
        if events is not None:
            events.close()
        if created:
            shutdown(clean)


def build(s: Session, verbose: bool) -> None:
    """Data, network, controllers, loaders, optimizer, schedule, scaler and loss of the session."""
    t = s.rc.training
    torch.manual_seed(t.seed)
    train_ds, val_ds = build_datasets(s.cfg["data"])
    check_num_classes(train_ds, s.rc.network.kwargs.num_classes)
    s.net, _ = build_network(s.cfg)
    s.controllers = build_controllers(s.cfg, s.net)
    for c in s.controllers:
        c.log, c.detail = s.say, verbose
    if s.world > 1 and t.sync_bn:
        convert_sync_batchnorm(s.net)
    s.net.to(s.device)
    if t.channels_last:
        s.net.to(memory_format=torch.channels_last)
    pin = s.device.type == "cuda"
    s.train_loader = make_train_loader(s.rc.data, train_ds, s.rank, s.world, t.seed, pin)
    s.val_loader = make_val_loader(s.rc.data, val_ds, s.rank, s.world, pin)
    if t.ema is not None:
        s.ema = WeightEMA(s.net, t.ema.decay, t.ema.start_epoch)
    s.optimizer = build_optimizer(s.cfg["training"]["gd"], s.net)
    s.scheduler, s.per_batch = build_scheduler(s.cfg["training"]["gd"], s.optimizer, t.n_epochs,
                                               len(s.train_loader))
    s.scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp)
    s.criterion = nn.CrossEntropyLoss(label_smoothing=t.loss_fn.kwargs.label_smoothing)
    s.data_hash = fingerprint(train_ds) + ":" + fingerprint(val_ds)


def restore(s: Session, resume: bool, overwrite: bool, parameters: dict | None) -> tuple[int, float, list]:
    """The run folder's checkpoint into the session (when resuming); then the config, a provenance entry and
    the history are written for the epochs to come. Returns ``(first epoch, best top-1 so far, history)``."""
    state = None
    if s.main:
        try:
            state = open_for_training(s.run, s.cfg, resume=resume, overwrite=overwrite)
        except LabkitError as err:
            state = err
    if s.world > 1:
        state = _broadcast(state)  # every rank continues from the same checkpoint (or stops)
    if isinstance(state, LabkitError):
        raise state
    n_epochs, start, best, history = s.rc.training.n_epochs, 0, -math.inf, []
    if state is not None:
        ckpt = state.checkpoint
        s.net.load_state_dict(ckpt.get(TRAINED_WEIGHTS, ckpt["state_dict"]))
        if s.ema is not None and TRAINED_WEIGHTS in ckpt:  # state_dict is the averaged network
            s.ema.load_averages(ckpt["state_dict"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        if s.scheduler is not None:
            s.scheduler.load_state_dict(ckpt["scheduler"])
        s.scaler.load_state_dict(ckpt["scaler"])
        for c, cstate in zip(s.controllers, ckpt.get("controllers", [])):
            c.load_state_dict(cstate)
        start, best, history = state.start_epoch, ckpt["best_top1"], state.history
        if start < n_epochs:
            s.say(f"resuming {s.run.path} at epoch {start + 1}/{n_epochs} (best top-1 so far {best:.2f}%)")
    elif resume:
        s.say(f"no checkpoint in {s.run.path} yet: starting from epoch 1")
    if s.main and start < n_epochs:
        s.run.write_config(s.cfg)
        s.run.write_history(history)
        s.provenance = provenance_entry(s.cfg, str(s.device), s.data_hash, start if state else None,
                                        parameters)
    elif s.main:
        s.say(f"{s.run.path} is complete ({n_epochs} epochs): nothing to train")
    return start, best, history


def run_epoch(s: Session, epoch: int, best: float) -> dict:
    """Train one epoch, validate; returns its history record (metrics, lr, per-quantizer bounds, time)."""
    t0 = time.perf_counter()
    _seed_epoch(s.rc.training.seed, epoch)
    s.train_loader.sampler.set_epoch(epoch)
    for c in s.controllers:
        c.step_pre_training_epoch(epoch)
    if s.ema is not None:
        s.ema.begin_epoch(epoch)
    for callback in s.callbacks:
        if hasattr(callback, "on_epoch_start"):
            callback.on_epoch_start(epoch)
    if s.main:
        _write_events(s.run, s.controllers)
    lr = s.optimizer.param_groups[0]["lr"]
    n_epochs = s.rc.training.n_epochs
    train_metrics = train_one_epoch(s, epoch, desc=f"epoch {epoch + 1}/{n_epochs}")
    for c in s.controllers:
        c.step_pre_validation_epoch(epoch)
    s.evaluated = s.ema.averaged(s.net) if s.ema is not None and s.ema.active else s.net
    valid = evaluate(s.evaluated, s.val_loader, s.device, s.amp, s.progress)
    if not math.isfinite(valid["loss"]):
        x, _ = next(iter(s.val_loader))
        raise NonFiniteError(f"validation loss became {valid['loss']} at epoch {epoch + 1}: the first "
                             f"non-finite output is {first_non_finite(s.evaluated, x.to(s.device))}; epoch "
                             f"{epoch + 1} was not saved. Lower training.gd.opt.kwargs.lr or check that "
                             "layer, then resume")
    if s.scheduler is not None and not s.per_batch:
        s.scheduler.step()
    record = {"epoch": epoch, "lr": lr, "train": train_metrics, "valid": valid,
              "best_top1": max(best, valid["top1"]), "seconds": round(time.perf_counter() - t0, 3)}
    if s.evaluated is not s.net:
        record["weights"] = "ema"
    quant = quant_state(s.evaluated)
    if quant:
        record["quant"] = quant
    return record


def save(s: Session, history: list[dict]) -> None:
    """Write the history and the checkpoint of the last epoch (``best.ckpt`` too when it is the best),
    report."""
    record, cfg = history[-1], s.cfg
    if s.main:
        s.run.write_history(history)
        network = {k: cfg["network"][k] for k in ("class", "kwargs", "quantize") if k in cfg["network"]}
        averaged = {} if s.evaluated is s.net else {TRAINED_WEIGHTS: s.net.state_dict()}
        ckpt = make_checkpoint(
            s.evaluated.state_dict(), network, config=cfg, epoch=record["epoch"],
            best_top1=record["best_top1"], optimizer=s.optimizer.state_dict(),
            scheduler=s.scheduler.state_dict() if s.scheduler is not None else None,
            scaler=s.scaler.state_dict(),
            controllers=[c.state_dict() for c in s.controllers], **averaged)
        s.run.save_checkpoint(ckpt, best=record["valid"]["top1"] >= record["best_top1"])
        if s.provenance is not None:
            s.run.add_provenance(s.provenance)
            s.provenance = None
    tr, va = record["train"], record["valid"]
    s.say(f"epoch {record['epoch'] + 1:>3}/{s.rc.training.n_epochs}  lr {record['lr']:.3g}  train loss "
          f"{tr['loss']:.4f} top1 {tr['top1']:.2f}%  |  valid loss {va['loss']:.4f} top1 {va['top1']:.2f}% "
          f"top5 {va['top5']:.2f}%  ({record['seconds']:.1f} s)")
    for callback in s.callbacks:
        callback(record)


def train_one_epoch(s: Session, epoch: int, desc: str = "train") -> dict:
    """One pass over the training loader; controllers step before every batch. Returns loss/top-1/top-5; the
    callbacks' ``on_batch`` methods see the running metrics after every batch."""
    s.model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    tqt = tqt_modules(s.net)
    on_batch = _batch_hook(s.callbacks, s.net, epoch)
    bar = progress_bar(s.train_loader, desc=desc, leave=False, disable=not s.progress)
    for batch, (x, y) in enumerate(bar):
        for c in s.controllers:
            c.step_pre_training_batch()
        x, y = to_device(x, y, s.device, s.rc.training.channels_last)
        with autocast(s.device, s.amp):
            logits = s.model(x)
            loss = s.criterion(logits.float(), y)
        if not torch.isfinite(loss):
            _diverged(s, loss, x, epoch, batch)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if tqt:
            s.scaler.unscale_(s.optimizer)  # the normalisation needs the true gradients
            normalize_tqt_grads(tqt)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        if s.ema is not None:
            s.ema.update()
        if s.per_batch:
            s.scheduler.step()
        c1, c5 = topk_correct(logits.detach().float(), y)
        sums = [a + b for a, b in zip(sums, (loss.item() * len(y), c1, c5, len(y)))]
        bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}", top1=f"{100 * sums[1] / sums[3]:.1f}", refresh=False)
        if on_batch is not None:
            on_batch(batch, len(s.train_loader), summarise(*sums))
    return summarise(*all_reduce_sum(sums, s.device))


def _diverged(s: Session, loss: torch.Tensor, x: torch.Tensor, epoch: int, batch: int) -> None:
    lr = s.optimizer.param_groups[0]["lr"]
    where = first_non_finite(s.model, x)
    advice = ("check the dataset" if where.startswith("the input") else
              f"lower training.gd.opt.kwargs.lr (now {lr:.3g}) or check that layer's settings, then resume "
              "(--resume) from the last checkpoint")
    raise NonFiniteError(f"training loss became {loss.detach().item()} at epoch {epoch + 1}, batch "
                         f"{batch + 1}: the first non-finite output is {where}; {advice}")


@torch.no_grad()
def first_non_finite(model: nn.Module, x: torch.Tensor) -> str:
    """Where a forward pass on ``x`` first produces inf/NaN: ``"the input batch"`` or ``"module 'name'
    (Type)"`` (leaf modules in execution order), or ``"no module"`` when this pass stays finite."""
    if not torch.isfinite(x).all():
        return "the input batch (it holds inf/NaN values: check the dataset)"
    found: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            def hook(mod, _inputs, out, name=name):
                if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                    found.append(f"module '{name}' ({type(mod).__name__})")
            hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else "no module (the loss itself overflowed)"


def _seed_epoch(seed: int, epoch: int) -> None:
    """Dropout and augmentation draw from the global RNG, reseeded per epoch so a resumed run matches."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def quant_state(net: nn.Module) -> dict:
    """Per quantizer: lo/hi/eps(/log2 t) and ``kind`` (``weights`` or ``activations``); empty for a float
    net."""
    weights = {n for n, m in net.named_modules() if isinstance(m, (PACTConv2d, PACTLinear))}
    return {n: {**s, "kind": "weights" if n in weights else "activations"} for n,
            s in quant_summaries(net).items()}


def _write_events(run: RunFolder, controllers) -> None:
    """Append the controllers' reported commands (every quantizer's bounds) to ``quantizers.jsonl``."""
    events = [e for c in controllers for e in c.events]
    if events:
        with open(run.file(QUANTIZERS), "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    for c in controllers:
        c.events.clear()


def _batch_hook(callbacks, net: nn.Module, epoch: int):
    """``on_batch`` for :func:`train_one_epoch` that feeds the callbacks' ``on_batch`` methods (None:
    none)."""
    hooks = [cb.on_batch for cb in callbacks if hasattr(cb, "on_batch")]
    if not hooks:
        return None

    def on_batch(batch: int, n_batches: int, metrics: dict) -> None:
        record = {"epoch": epoch, "batch": batch, "batches": n_batches, "train": metrics,
                  "quant": lambda: quant_state(net)}
        for hook in hooks:
            hook(record)
    return on_batch


def _broadcast(obj):
    """Rank 0's ``obj`` on every process (the resume state: all ranks continue from the same checkpoint)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
