"""The training loop: one plain epoch loop in the spirit of torchvision's ``references/classification``.

A run folder holds ``config.json`` (the resolved config), ``last.ckpt`` / ``best.ckpt`` (written atomically),
and ``history.jsonl`` (one record per epoch: lr, train/valid metrics and, for quantized nets, per-layer
lo/hi/eps/log2 t). ``resume=True`` continues from ``last.ckpt`` and reaches the same weights as an
uninterrupted run: every epoch reseeds the RNGs from ``(seed, epoch)``.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from labkit.checkpoint import CheckpointError, load_file, make_checkpoint, read_state_dict, save_atomic
from labkit.convert import is_torchvision_state_dict, torchvision_key
from labkit.data import build_datasets, check_num_classes
from labkit.distributed import all_reduce_sum, convert_sync_batchnorm, init_from_env, shutdown
from labkit.models import MobileNetV2
from labkit.optim import build_optimizer, build_scheduler

HISTORY = "history.jsonl"


# ----------------------------------------------------------------------------------------- building
def build_network(cfg: dict) -> tuple[nn.Module, list | None]:
    """``network`` section -> ``(net, quantization report or None)``: model, pretrained weights, recipe."""
    network = cfg["network"]
    net = MobileNetV2(**network["kwargs"])
    if network.get("pretrained"):
        load_pretrained(net, network["pretrained"])
    report = None
    if network.get("quantize"):
        from labkit.recipe import pact_recipe

        net, report = pact_recipe(net, network["quantize"])
    return net, report


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load full-precision weights (labkit checkpoint, or a torchvision state dict) into ``net``."""
    state, _ = read_state_dict(path)
    if is_torchvision_state_dict(state):
        state = {torchvision_key(k): v for k, v in state.items()}
    own = net.state_dict()
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"'{path}' does not fit this network: '{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, the "
            f"network's is {tuple(own[wrong[0]].shape)} ({len(wrong)} tensors differ): network.pretrained needs a "
            "full-precision checkpoint of the same width and classes (network.kwargs capacity, num_classes)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"'{path}' does not fit this network ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): network.pretrained needs a full-precision "
            "checkpoint of the same width and classes (from labkit convert or an FP32 run)")


def build_controllers(cfg: dict, net: nn.Module) -> list:
    """``training.quantize`` (reference layout ``{"function", "kwargs"}`` or its kwargs alone) -> controllers."""
    quantize = cfg["training"].get("quantize")
    if not quantize:
        return []
    from labkit.quant import get_pact_controllers

    kwargs = quantize.get("kwargs", {}) if "function" in quantize else quantize
    return get_pact_controllers(net, **kwargs)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu")
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
        raise ValueError(f"data.train.dataloader.bs = {bs} is not divisible by the {world} processes: "
                         "the batch size is global, choose a multiple of the process count")
    if len(dataset) < bs:
        raise ValueError(f"the training set ({len(dataset)} images) is smaller than one batch ({bs}): "
                         "lower data.train.dataloader.bs")
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
    from tqdm.auto import tqdm

    net.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = [0.0, 0.0, 0.0, 0.0]
    for x, y in tqdm(loader, desc="valid", leave=False, disable=not progress, mininterval=1.0):
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


def train_one_epoch(model, loader, optimizer, scaler, device, criterion, controllers, scheduler_per_batch=None,
                    amp=False, progress=False, desc="train") -> dict:
    """One pass over ``loader``; controllers step before every batch. Returns train loss/top-1/top-5."""
    from tqdm.auto import tqdm

    model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for x, y in bar:
        for c in controllers:
            c.step_pre_training_batch()
        x, y = _to_device(x, y, device)
        with _autocast(device, amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)}: lower training.gd.opt.kwargs.lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler_per_batch is not None:
            scheduler_per_batch.step()
        c1, c5 = topk_correct(logits.detach().float(), y)
        sums = [s + v for s, v in zip(sums, (loss.item() * len(y), c1, c5, len(y)))]
        bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}", top1=f"{100 * sums[1] / sums[3]:.1f}", refresh=False)
    return _summarise(*all_reduce_sum(sums, device))


# ------------------------------------------------------------------------------------------- history
def read_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run folder's ``history.jsonl`` (empty list when there is none yet)."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_history(run_dir: Path, records: list[dict]) -> None:
    tmp = run_dir / (HISTORY + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(run_dir / HISTORY)


def _seed_epoch(seed: int, epoch: int) -> None:
    """Dropout and augmentation draw from the global RNG, reseeded per epoch so a resumed run matches."""
    import random

    import numpy as np

    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def quant_state(net: nn.Module) -> dict:
    """Per quantizer: lo/hi/eps(/log2 t) and ``kind`` (``weights`` or ``activations``); empty for a float net."""
    from labkit.quant import PACTConv2d, PACTLinear, quant_summaries

    weights = {n for n, m in net.named_modules() if isinstance(m, (PACTConv2d, PACTLinear))}
    return {n: {**s, "kind": "weights" if n in weights else "activations"} for n, s in quant_summaries(net).items()}


# ------------------------------------------------------------------------------------------- the run
def train(cfg: dict, output_dir: str | Path, *, resume: bool = False, device: str = "auto", progress: bool = True,
          callbacks: Iterable[Callable[[dict], None]] = (), log: Callable[[str], None] | None = print) -> dict:
    """Train ``cfg`` (a resolved config) into ``output_dir``; returns the final record plus ``best_top1``.

    ``callbacks`` get each epoch's history record (notebooks draw live plots from them). Under ``torchrun``
    the process group is joined here and left at the end.
    """
    dev = resolve_device(device)
    rank, world, local_rank, created = init_from_env(dev.type)
    clean = False
    try:
        result = _train(cfg, Path(output_dir), resume, dev, rank, world, local_rank, progress, callbacks, log)
        clean = True
        return result
    finally:
        if created:
            shutdown(clean)


def _train(cfg, out, resume, dev, rank, world, local_rank, progress, callbacks, log) -> dict:
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    main = rank == 0
    say = (log if main and log else (lambda _msg: None))
    tcfg = cfg["training"]
    seed = int(tcfg.get("seed", 0))
    n_epochs = int(tcfg["n_epochs"])
    amp = dev.type == "cuda" and tcfg.get("amp", True)

    torch.manual_seed(seed)
    train_ds, val_ds = build_datasets(cfg["data"])
    num_classes = cfg["network"]["kwargs"].get("num_classes", 1000)
    check_num_classes(train_ds, num_classes)
    net, _ = build_network(cfg)
    controllers = build_controllers(cfg, net)
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

    start_epoch, best_top1, history = 0, -math.inf, []
    last = out / "last.ckpt"
    if resume and last.is_file():
        ckpt = load_file(last)
        net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        for c, state in zip(controllers, ckpt.get("controllers", [])):
            c.load_state_dict(state)
        start_epoch, best_top1 = ckpt["epoch"] + 1, ckpt["best_top1"]
        history = [r for r in read_history(out) if r["epoch"] < start_epoch]
        say(f"resuming {out} at epoch {start_epoch}/{n_epochs} (best top-1 so far {best_top1:.2f}%)")
    elif resume:
        say(f"no checkpoint in {out} yet: starting from epoch 0")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _write_history(out, history)

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(controllers))

    record: dict = history[-1] if history else {}
    for epoch in range(start_epoch, n_epochs):
        t0 = time.perf_counter()
        _seed_epoch(seed, epoch)
        train_loader.sampler.set_epoch(epoch)
        for c in controllers:
            c.step_pre_training_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(model, train_loader, optimizer, scaler, dev, criterion, controllers,
                                        scheduler if per_batch else None, amp, progress and main,
                                        desc=f"epoch {epoch + 1}/{n_epochs}")
        for c in controllers:
            c.step_pre_validation_epoch(epoch)
        valid_metrics = evaluate(net, val_loader, dev, amp, progress and main)
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
            _write_history(out, history)
            ckpt = make_checkpoint(
                net.state_dict(), {k: cfg["network"][k] for k in ("class", "kwargs", "quantize") if k in cfg["network"]},
                config=cfg, epoch=epoch, best_top1=best_top1, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None, scaler=scaler.state_dict(),
                controllers=[c.state_dict() for c in controllers])
            save_atomic(ckpt, last)
            if valid_metrics["top1"] >= best_top1:
                save_atomic(ckpt, out / "best.ckpt")
        say(f"epoch {epoch + 1:>3}/{n_epochs}  lr {lr:.3g}  train loss {train_metrics['loss']:.4f} "
            f"top1 {train_metrics['top1']:.2f}%  |  valid loss {valid_metrics['loss']:.4f} "
            f"top1 {valid_metrics['top1']:.2f}% top5 {valid_metrics['top5']:.2f}%  ({record['seconds']:.1f} s)")
        for callback in callbacks:
            callback(record)
    return {**record, "best_top1": best_top1, "run_dir": str(out)}


def evaluate_checkpoint(checkpoint: str | Path, cfg: dict | None = None, device: str = "auto",
                        progress: bool = False) -> dict:
    """Validation metrics of a run checkpoint (its own config unless ``cfg`` is given)."""
    ckpt = load_file(checkpoint)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{checkpoint}' is not a labkit checkpoint (no state_dict)")
    cfg = cfg or ckpt.get("config")
    if cfg is None:
        raise CheckpointError(f"'{checkpoint}' carries no config: pass the config it was trained with")
    cfg = {**cfg, "network": {**cfg["network"], "pretrained": None}}
    dev = resolve_device(device)
    _, val_ds = build_datasets(cfg["data"])
    check_num_classes(val_ds, cfg["network"]["kwargs"].get("num_classes", 1000))
    net, _ = build_network(cfg)
    net.load_state_dict(ckpt["state_dict"])
    net.to(dev)
    return evaluate(net, make_val_loader(cfg, val_ds), dev, amp=dev.type == "cuda", progress=progress)
