"""Optimizer helpers for quantized networks: PACT's own clip-bound decay, and TQT's gradient normalisation.

``PACTSGD`` / ``PACTAdam`` put the clipping bounds (``clip_lo`` / ``clip_hi``) in their own parameter group
with L2 decay ``pact_decay`` (the PACT paper's alpha regularisation) and TQT's ``log2_t`` in a group without
decay; everything else gets the usual ``weight_decay``. All parameters are registered, trainable now or later
(bounds learn only after ``start``).

:func:`normalize_tqt_grads` replaces each TQT quantizer's raw ``log2_t`` gradient by its Adam-like
normalisation (:func:`labkit.quant.functional.normalize_tqt_grad`). Call it once per optimizer step, right
before ``optimizer.step()``: there the gradients are final (accumulated over micro-batches, averaged by DDP,
unscaled by ``GradScaler.unscale_`` under AMP). The training loop does::

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    normalize_tqt_grads(tqt_quantizers)      # tqt_quantizers = tqt_modules(net), once
    scaler.step(optimizer)
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.quant.base import QuantizerBase
from labkit.quant.functional import normalize_tqt_grad


def split_parameters(net: nn.Module) -> tuple[list, list, list]:
    """``(clip_params, log2_t_params, other_params)`` of ``net`` (each parameter once)."""
    clip, tqt, seen = [], [], set()
    for m in net.modules():
        if isinstance(m, QuantizerBase):
            for p in m.clip_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    (tqt if m.tqt else clip).append(p)
    other = [p for p in net.parameters() if id(p) not in seen]
    return clip, tqt, other


def _groups(net: nn.Module, pact_decay: float, weight_decay: float) -> list[dict]:
    clip, tqt, other = split_parameters(net)
    groups = [{"params": other, "weight_decay": weight_decay},
              {"params": clip, "weight_decay": float(pact_decay), "name": "clip"},
              {"params": tqt, "weight_decay": 0.0, "name": "log2_t"}]
    return [g for g in groups if g["params"]]


class PACTSGD(torch.optim.SGD):
    """``torch.optim.SGD`` over ``net`` with ``pact_decay`` as L2 decay on clip bounds only."""

    def __init__(self, net: nn.Module, pact_decay: float = 0.0, **sgd_kwargs):
        wd = float(sgd_kwargs.pop("weight_decay", 0.0))
        super().__init__(_groups(net, pact_decay, wd), **sgd_kwargs)


class PACTAdam(torch.optim.Adam):
    """``torch.optim.Adam`` over ``net`` with ``pact_decay`` as L2 decay on clip bounds only."""

    def __init__(self, net: nn.Module, pact_decay: float = 0.0, **adam_kwargs):
        wd = float(adam_kwargs.pop("weight_decay", 0.0))
        super().__init__(_groups(net, pact_decay, wd), **adam_kwargs)


# ---------------------------------------------------------------------------------------- TQT normalisation
def tqt_modules(net: nn.Module) -> list[QuantizerBase]:
    """The TQT quantizers of ``net`` whose ``log2_t`` is learned (what :func:`normalize_tqt_grads` takes)."""
    return [m for m in net.modules() if isinstance(m, QuantizerBase) and m.tqt and m.learn_clip]


@torch.no_grad()
def normalize_tqt_grads(modules: nn.Module | list[QuantizerBase]) -> int:
    """Normalise the ``log2_t`` gradients of ``modules`` (a network, or :func:`tqt_modules` of one) in place;
    returns how many quantizers had a gradient. Quantizers that share ``tqt_beta``, ``tqt_clip_grad``,
    device and dtypes are normalised together on their concatenated gradients (a few dozen tensor ops per
    step instead of a dozen per quantizer). A non-finite gradient passes through and leaves that quantizer's
    state alone; no host synchronisation."""
    if isinstance(modules, nn.Module):
        modules = tqt_modules(modules)
    todo: dict[tuple, list] = {}
    for m in modules:
        g = m.log2_t.grad
        if g is not None:
            key = (m.tqt_beta, m.tqt_clip_grad, g.device, g.dtype, m.tqt_var.dtype, m.tqt_step.dtype)
            todo.setdefault(key, []).append(m)
    for (beta, clip_grad, *_), mods in todo.items():
        if len(mods) == 1:
            m = mods[0]
            m.log2_t.grad.copy_(normalize_tqt_grad(m.log2_t.grad, m.tqt_var, m.tqt_step, beta, clip_grad))
        else:
            _normalize_many(mods, beta, clip_grad)
    return sum(len(v) for v in todo.values())


def _normalize_many(mods: list, beta: float, clip_grad: bool) -> None:
    """:func:`normalize_tqt_grad` for several quantizers at once, each keeping its own finiteness flag."""
    grads = [m.log2_t.grad for m in mods]
    var_list = [m.tqt_var for m in mods]
    step_list = [m.tqt_step for m in mods]
    sizes = [g.numel() for g in grads]
    dev = grads[0].device
    seg = torch.repeat_interleave(torch.arange(len(mods), device=dev), torch.tensor(sizes, device=dev))
    var = torch.cat([v.reshape(-1) for v in var_list])
    gd = torch.cat([g.reshape(-1) for g in grads]).to(var.dtype)
    ok = torch.ones(len(mods), dtype=var.dtype, device=dev).scatter_reduce_(
        0, seg, torch.isfinite(gd).to(var.dtype), reduce="amin").bool()
    steps = torch.stack([t.reshape(()) for t in step_list])
    out = normalize_tqt_grad(gd, var, steps[seg], beta, clip_grad, ok=ok[seg])
    torch._foreach_copy_(var_list, [t.view_as(v) for t, v in zip(var.split(sizes), var_list)])
    torch._foreach_copy_(step_list, [t.view_as(v) for t, v in zip((steps + ok).unbind(), step_list)])
    torch._foreach_copy_(grads, [t.view_as(g).to(g.dtype) for t, g in zip(out.split(sizes), grads)])
