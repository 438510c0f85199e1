"""Optimizers with a separate L2 decay for clip parameters (PACT's alpha regularisation).

Three parameter groups: PACT bounds (``clip_lo``/``clip_hi`` of quantizers) with ``weight_decay = pact_decay``;
TQT ``log2_t`` with no decay (L2 on log2 t would pull t towards 1); everything else with the usual
``weight_decay``. All parameters are registered, trainable now or later (bounds learn only after ``start``).
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.quant.modules import QuantizerBase


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
