"""The training loop: one plain epoch loop in the spirit of torchvision's ``references/classification``.

Networks come from :mod:`labkit.train.build`, the run folder (config, provenance, history, atomic checkpoints,
lock) is :mod:`labkit.train.runs`. Per batch: controllers step, forward (AMP on CUDA), backward, unscale,
TQT ``log2 t`` gradient normalisation (:func:`labkit.quant.normalize_tqt_grads`, once per optimizer step),
optimizer step. ``resume=True`` continues from ``last.ckpt`` and reaches the same weights as an uninterrupted
run: every epoch reseeds the RNGs from ``(seed, epoch)``. A non-finite loss or validation metric stops the
run with :class:`NonFiniteError` naming the epoch, the batch and the first module whose output turned
non-finite; nothing of that epoch is written.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from labkit.config.errors import LabkitError
from labkit.quant import PACTConv2d, PACTLinear, normalize_tqt_grads, quant_summaries, tqt_modules
from labkit.train.build import build_controllers, build_network
from labkit.train.checkpoint import make_checkpoint
from labkit.train.data import build_datasets, check_num_classes, fingerprint
from labkit.train.distributed import all_reduce_sum, convert_sync_batchnorm, init_from_env, shutdown
from labkit.train.gd import build_optimizer, build_scheduler
from labkit.train.progress import progress as progress_bar
from labkit.train.runs import QUANTIZERS, RunFolder, load_run, open_for_training, provenance_entry

__all__ = ["train", "evaluate", "evaluate_checkpoint", "train_one_epoch", "topk_correct", "resolve_device",
           "NonFiniteError", "DeviceError", "quant_state"]


class NonFiniteError(LabkitError, FloatingPointError):
    """The loss or a metric became inf/NaN; the message names the epoch, batch and first non-finite module."""


class DeviceError(LabkitError, ValueError):
    """The requested device is not available."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; an explicit CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise DeviceError(f"device '{device}' is not a device name ({err}): use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' was asked for but no CUDA GPU is visible: use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once across processes."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader_cfg(cfg: dict, split: str, default_bs: int) -> tuple[int, int]:
    dl = cfg["data"].get(split, {}).get("dataloader", {})
    return dl.get("bs", default_bs), dl.get("num_workers", 0)


def make_train_loader(cfg: dict, dataset, rank: int, world: int, seed: int, pin: bool) -> DataLoader:
    """Seeded DistributedSampler (one process too) over the global batch ``bs``: each rank gets ``bs/world``."""
    bs, workers = _loader_cfg(cfg, "train", 64)
    if bs % world:
        raise LabkitError(f"data.train.dataloader.bs = {bs} is not divisible by the {world} processes: the batch "
                          "size is global, choose a multiple of the process count")
    if len(dataset) < bs:
        raise LabkitError(f"the training set ({len(dataset)} images) is smaller than one batch ({bs}): lower "
                          "data.train.dataloader.bs")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # workers are started anew each epoch (not persistent): their seeds then come from the epoch's reseeded
    # global RNG (_seed_epoch), so augmentation after a resume matches the uninterrupted run
    return DataLoader(dataset, batch_size=bs // world, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin)


def make_val_loader(cfg: dict, dataset, rank: int = 0, world: int = 1, pin: bool = False) -> DataLoader:
    """Every validation sample exactly once across the processes (no padding, unlike DistributedSampler)."""
    bs, workers = _loader_cfg(cfg, "valid", _loader_cfg(cfg, "train", 64)[0])
    return DataLoader(dataset, batch_size=max(1, bs // world), sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=workers, pin_memory=pin)


# ------------------------------------------------------------------------------------------ metrics
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the ``k`` largest logits, for each ``k``."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


def _summarise(loss_sum: float, c1: float, c5: float, n: float) -> dict:
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "n": int(n)}


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
             progress: bool = False) -> dict:
    """Loss, top-1 and top-5 (percent) of ``net`` over ``loader`` (summed across processes)."""
    net.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = [0.0, 0.0, 0.0, 0.0]
    for x, y in progress_bar(loader, desc="valid", leave=False, disable=not progress):
        x, y = _to_device(x, y, device)
        with _autocast(device, amp):
            logits = net(x)
        c1, c5 = topk_correct(logits.float(), y)
        sums = [s + v for s, v in zip(sums, (float(criterion(logits.float(), y)), c1, c5, len(y)))]
    return _summarise(*all_reduce_sum(sums, device))


def _to_device(x, y, device):
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=non_blocking)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.float16) if amp else nullcontext()


@torch.no_grad()
def first_non_finite(model: nn.Module, x: torch.Tensor) -> str:
    """Where a forward pass on ``x`` first produces inf/NaN: ``"the input batch"`` or ``"module 'name' (Type)"``
    (leaf modules in execution order), or ``"no module"`` when this pass stays finite."""
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


def train_one_epoch(model, loader, optimizer, scaler, device, criterion, controllers, scheduler_per_batch=None,
                    amp=False, progress=False, desc="train", tqt=(), epoch: int = 0, on_batch=None) -> dict:
    """One pass over ``loader``; controllers step before every batch. Returns train loss/top-1/top-5.
    ``on_batch(batch, n_batches, metrics)`` follows every batch (running train loss/top-1 so far)."""
    model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    bar = progress_bar(loader, desc=desc, leave=False, disable=not progress)
    for batch, (x, y) in enumerate(bar):
        for c in controllers:
            c.step_pre_training_batch()
        x, y = _to_device(x, y, device)
        with _autocast(device, amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            loss = loss.detach()
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteError(f"training loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}: the "
                                 f"first non-finite output is {first_non_finite(model, x)}; lower "
                                 f"training.gd.opt.kwargs.lr (now {lr:.3g}) or check that layer's settings, then "
                                 "resume (--resume) from the last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tqt:
            scaler.unscale_(optimizer)  # the normalisation needs the true gradients
            normalize_tqt_grads(tqt)
        scaler.step(optimizer)
        scaler.update()
        if scheduler_per_batch is not None:
            scheduler_per_batch.step()
        c1, c5 = topk_correct(logits.detach().float(), y)
        sums = [s + v for s, v in zip(sums, (loss.item() * len(y), c1, c5, len(y)))]
        bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}", top1=f"{100 * sums[1] / sums[3]:.1f}", refresh=False)
        if on_batch is not None:
            on_batch(batch, len(loader), _summarise(*sums))
    return _summarise(*all_reduce_sum(sums, device))


def _seed_epoch(seed: int, epoch: int) -> None:
    """Dropout and augmentation draw from the global RNG, reseeded per epoch so a resumed run matches."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def quant_state(net: nn.Module) -> dict:
    """Per quantizer: lo/hi/eps(/log2 t) and ``kind`` (``weights`` or ``activations``); empty for a float net."""
    weights = {n for n, m in net.named_modules() if isinstance(m, (PACTConv2d, PACTLinear))}
    return {n: {**s, "kind": "weights" if n in weights else "activations"} for n, s in quant_summaries(net).items()}


# ------------------------------------------------------------------------------------------- the run
def train(cfg: dict, output_dir: str | Path, *, resume: bool = False, overwrite: bool = False, device: str = "auto",
          progress: bool = True, callbacks: Iterable[Callable[[dict], None]] = (),
          log: Callable[[str], None] | None = print, parameters: dict | None = None, verbose: bool = False) -> dict:
    """Train ``cfg`` (a resolved config) into the run folder ``output_dir``; returns the final record plus
    ``best_top1`` and ``run_dir``.

    A folder that already holds a run needs ``resume`` (same config; a longer ``n_epochs`` where the schedule
    allows) or ``overwrite`` (see :func:`labkit.train.runs.open_for_training`). ``callbacks`` get each epoch's history
    record (notebooks draw live plots from them); one with an ``on_batch`` method also gets, after every training
    batch, ``{"epoch", "batch", "batches", "train", "quant": () -> quant_state(net)}``. Controller commands are one
    line each in ``log``; every quantizer's bounds go to the run folder's ``quantizers.jsonl`` (and to ``log``
    with ``verbose``). ``parameters``: the notebook parameters to record as the
    run's provenance (default: the command line). Under ``torchrun`` the process group is joined here and
    left at the end.
    """
    dev = resolve_device(device)
    rank, world, local_rank, created = init_from_env(dev.type)
    clean = False
    try:
        result = _train(cfg, RunFolder(output_dir), resume, overwrite, dev, rank, world, local_rank, progress,
                        callbacks, log, parameters, verbose)
        clean = True
        return result
    finally:
        if created:
            shutdown(clean)


def _train(cfg, run, resume, overwrite, dev, rank, world, local_rank, progress, callbacks, log, parameters,
           verbose) -> dict:
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    main = rank == 0
    say = (log if main and log else (lambda _msg: None))
    tcfg = cfg["training"]
    seed = int(tcfg.get("seed", 0))
    n_epochs = int(tcfg["n_epochs"])
    amp = dev.type == "cuda" and tcfg.get("amp", True)

    # everything is built (and so checked) before anything is written
    torch.manual_seed(seed)
    train_ds, val_ds = build_datasets(cfg["data"])
    check_num_classes(train_ds, cfg["network"]["kwargs"].get("num_classes", 1000))
    net, _ = build_network(cfg)
    controllers = build_controllers(cfg, net)
    for c in controllers:
        c.log, c.detail = say, verbose
    if world > 1 and tcfg.get("sync_bn", True):
        convert_sync_batchnorm(net)
    net.to(dev)
    if dev.type == "cuda" and tcfg.get("channels_last", True):
        net.to(memory_format=torch.channels_last)
    train_loader = make_train_loader(cfg, train_ds, rank, world, seed, pin=dev.type == "cuda")
    val_loader = make_val_loader(cfg, val_ds, rank, world, pin=dev.type == "cuda")
    optimizer = build_optimizer(tcfg["gd"], net)
    scheduler, per_batch = build_scheduler(tcfg["gd"], optimizer, n_epochs, len(train_loader))
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    criterion = nn.CrossEntropyLoss(**tcfg.get("loss_fn", {}).get("kwargs", {}))
    tqt = tqt_modules(net)

    with (run.writing() if main else nullcontext(run)):
        state = None
        if main:
            try:
                state = open_for_training(run, cfg, resume=resume, overwrite=overwrite)
            except LabkitError as err:
                state = err
        if world > 1:
            state = _broadcast(state)  # every rank continues from the same checkpoint (or stops)
        if isinstance(state, LabkitError):
            raise state
        start_epoch, best_top1, history = 0, -math.inf, []
        if state is not None:
            ckpt = state.checkpoint
            net.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            for c, cstate in zip(controllers, ckpt.get("controllers", [])):
                c.load_state_dict(cstate)
            start_epoch, best_top1, history = state.start_epoch, ckpt["best_top1"], state.history
            if start_epoch < n_epochs:
                say(f"resuming {run.path} at epoch {start_epoch + 1}/{n_epochs} (best top-1 so far {best_top1:.2f}%)")
        elif resume:
            say(f"no checkpoint in {run.path} yet: starting from epoch 1")
        if main and start_epoch < n_epochs:
            data_hash = fingerprint(train_ds) + ":" + fingerprint(val_ds)
            run.write_config(cfg)
            run.add_provenance(provenance_entry(cfg, str(dev), data_hash, start_epoch if state else None, parameters))
            run.write_history(history)
        elif main:
            say(f"{run.path} is complete ({n_epochs} epochs): nothing to train")

        model = net
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=bool(controllers))

        record: dict = history[-1] if history else {}
        for epoch in range(start_epoch, n_epochs):
            t0 = time.perf_counter()
            _seed_epoch(seed, epoch)
            train_loader.sampler.set_epoch(epoch)
            for c in controllers:
                c.step_pre_training_epoch(epoch)
            if main:
                _write_events(run, controllers)
            lr = optimizer.param_groups[0]["lr"]
            on_batch = _batch_hook(callbacks, net, epoch)
            train_metrics = train_one_epoch(model, train_loader, optimizer, scaler, dev, criterion, controllers,
                                            scheduler if per_batch else None, amp, progress and main,
                                            desc=f"epoch {epoch + 1}/{n_epochs}", tqt=tqt, epoch=epoch,
                                            on_batch=on_batch)
            for c in controllers:
                c.step_pre_validation_epoch(epoch)
            valid_metrics = evaluate(net, val_loader, dev, amp, progress and main)
            if not math.isfinite(valid_metrics["loss"]):
                x, _ = next(iter(val_loader))
                raise NonFiniteError(f"validation loss became {valid_metrics['loss']} at epoch {epoch + 1}: the first "
                                     f"non-finite output is {first_non_finite(net, x.to(dev))}; epoch {epoch + 1} was "
                                     "not saved. Lower training.gd.opt.kwargs.lr or check that layer, then resume")
            if scheduler is not None and not per_batch:
                scheduler.step()
            best_top1 = max(best_top1, valid_metrics["top1"])
            record = {"epoch": epoch, "lr": lr, "train": train_metrics, "valid": valid_metrics,
                      "best_top1": best_top1, "seconds": round(time.perf_counter() - t0, 3)}
            quant = quant_state(net)
            if quant:
                record["quant"] = quant
            history.append(record)
            if main:
                run.write_history(history)
                ckpt = make_checkpoint(
                    net.state_dict(), {k: cfg["network"][k] for k in ("class", "kwargs", "quantize") if k in cfg["network"]},
                    config=cfg, epoch=epoch, best_top1=best_top1, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None, scaler=scaler.state_dict(),
                    controllers=[c.state_dict() for c in controllers])
                run.save_checkpoint(ckpt, best=valid_metrics["top1"] >= best_top1)
            say(f"epoch {epoch + 1:>3}/{n_epochs}  lr {lr:.3g}  train loss {train_metrics['loss']:.4f} "
                f"top1 {train_metrics['top1']:.2f}%  |  valid loss {valid_metrics['loss']:.4f} "
                f"top1 {valid_metrics['top1']:.2f}% top5 {valid_metrics['top5']:.2f}%  ({record['seconds']:.1f} s)")
            for callback in callbacks:
                callback(record)
    return {**record, "best_top1": best_top1, "run_dir": str(run.path)}


def _write_events(run: RunFolder, controllers) -> None:
    """Append the controllers' reported commands (every quantizer's bounds) to ``quantizers.jsonl``."""
    events = [e for c in controllers for e in c.events]
    if events:
        with open(run.file(QUANTIZERS), "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    for c in controllers:
        c.events.clear()


def _batch_hook(callbacks, net: nn.Module, epoch: int):
    """``on_batch`` for :func:`train_one_epoch` that feeds the callbacks' ``on_batch`` methods (None: none)."""
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


def evaluate_checkpoint(checkpoint: str | Path, cfg: dict | None = None, device: str = "auto",
                        progress: bool = False) -> dict:
    """Validation metrics of a run folder or checkpoint (its own config unless ``cfg`` is given)."""
    loaded = load_run(checkpoint, config=cfg)
    dev = resolve_device(device)
    _, val_ds = build_datasets(loaded.config["data"])
    check_num_classes(val_ds, loaded.config["network"]["kwargs"].get("num_classes", 1000))
    loaded.net.to(dev)
    return evaluate(loaded.net, make_val_loader(loaded.config, val_ds), dev, amp=dev.type == "cuda",
                    progress=progress)
