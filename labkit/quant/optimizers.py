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

import functools

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

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
    for m in modules:  # direct dict lookups: nn.Module.__getattr__ is slow, and this runs every step
        g, spec = m._parameters["log2_t"].grad, m._spec
        if g is not None:
            key = (spec.tqt_beta, spec.tqt_clip_grad, g.device, g.dtype, m._buffers["tqt_var"].dtype)
            todo.setdefault(key, []).append(m)
    for (beta, clip_grad, *_), mods in todo.items():
        _normalize_many(mods, beta, clip_grad)
    return sum(len(v) for v in todo.values())


def _normalize_many(mods: list, beta: float, clip_grad: bool) -> None:
    """:func:`normalize_tqt_grad` for several quantizers at once, each keeping its own finiteness flag."""
    grads = [m._parameters["log2_t"].grad for m in mods]
    var_list = [m._buffers["tqt_var"] for m in mods]
    step_list = [m._buffers["tqt_step"] for m in mods]
    seg = _segments(tuple(g.numel() for g in grads), grads[0].device)
    var = _flatten_dense_tensors(var_list)
    gd = _flatten_dense_tensors(grads).to(var.dtype)
    ok = torch.ones(len(mods), dtype=var.dtype, device=seg.device).scatter_reduce_(
        0, seg, torch.isfinite(gd).to(var.dtype), reduce="amin").bool()
    steps = _flatten_dense_tensors(step_list)
    out = normalize_tqt_grad(gd, var, steps[seg], beta, clip_grad, ok=ok[seg])
    torch._foreach_copy_(var_list, _unflatten_dense_tensors(var, var_list))
    torch._foreach_copy_(step_list, _unflatten_dense_tensors(steps + ok, step_list))
    torch._foreach_copy_(grads, _unflatten_dense_tensors(out.to(grads[0].dtype), grads))


@functools.lru_cache(maxsize=8)
def _segments(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Which quantizer each element of the concatenated gradients belongs to."""
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
