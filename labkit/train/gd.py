"""Optimizers and learning-rate schedules named in ``training.gd`` (the reference framework's names)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from labkit.quant import PACTSGD, PACTAdam


class HandScheduler(LambdaLR):
    """``lr(epoch) = base_lr * schedule[max{e in schedule : e <= epoch}]``; stepped once per epoch.

    ``schedule`` maps epochs (as strings or ints) to factors, e.g. ``{"0": 1, "3": 0.1, "5": 0.01}``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: dict, last_epoch: int = -1):
        self.milestones = sorted((int(e), float(f)) for e, f in schedule.items())
        if not self.milestones or self.milestones[0][0] != 0:
            self.milestones.insert(0, (0, 1.0))
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, epoch: int) -> float:
        return [f for e, f in self.milestones if e <= epoch][-1]


def build_optimizer(gd_cfg: dict, net: nn.Module) -> torch.optim.Optimizer:
    """``training.gd.opt`` -> optimizer. ``PACTSGD``/``PACTAdam`` take the net (``takes_net``) and
    ``pact_decay``."""
    opt = gd_cfg["opt"]
    name, kwargs = opt["class"], dict(opt.get("kwargs", {}))
    if name in ("PACTSGD", "PACTAdam"):
        return {"PACTSGD": PACTSGD, "PACTAdam": PACTAdam}[name](net, **kwargs)
    kwargs.pop("pact_decay", None)
    return getattr(torch.optim, name)(net.parameters(), **kwargs)


def build_scheduler(gd_cfg: dict, optimizer: torch.optim.Optimizer, n_epochs: int, steps_per_epoch: int):
    """``training.gd.lr_sched`` -> ``(scheduler, per_batch)``; ``(None, False)`` when absent.

    ``OneCycleLR`` steps per batch (``epochs`` and ``steps_per_epoch`` are filled in); the others per epoch.
    """
    sched = gd_cfg.get("lr_sched")
    if not sched:
        return None, False
    name, kwargs = sched["class"], dict(sched.get("kwargs", {}))
    if name == "HandScheduler":
        return HandScheduler(optimizer, **kwargs), False
    if name == "OneCycleLR":
        kwargs.setdefault("epochs", n_epochs)
        kwargs.setdefault("steps_per_epoch", steps_per_epoch)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, **kwargs), True
    if name == "CosineAnnealingLR":
        kwargs.setdefault("T_max", n_epochs)
    return getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs), False


def schedule_extension_problem(gd_cfg: dict) -> str | None:
    """Why the learning-rate schedule of ``training.gd`` cannot follow a longer ``n_epochs`` (None: it can).

    Epoch-indexed schedules (HandScheduler, StepLR, MultiStepLR, none) go on unchanged; CosineAnnealingLR
    only with its own ``T_max`` (else ``T_max`` is ``n_epochs`` and the whole curve would change);
    OneCycleLR's curve is fixed by its total number of steps."""
    sched = gd_cfg.get("lr_sched")
    if not sched:
        return None
    name, kwargs = sched["class"], sched.get("kwargs") or {}
    if name == "OneCycleLR":
        return "OneCycleLR's schedule is fixed by its total steps (epochs x batches) and cannot be extended"
    if name == "CosineAnnealingLR" and "T_max" not in kwargs:
        return ("CosineAnnealingLR takes T_max = n_epochs, so a longer run would change the schedule of the "
                "epochs already trained (set training.gd.lr_sched.kwargs.T_max explicitly to extend)")
    return None
