"""Test fixtures that stand in for what cannot be had here (no download): a torchvision network."""

from __future__ import annotations

import torch
from torch import nn


def random_torchvision_model(width: float = 1.0, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A torchvision ``mobilenet_v2`` with random weights and non-trivial BN statistics, in eval mode.

    Stands in for the pretrained weights where they cannot be had (no download here): conversion is
    checked on it exactly as on the real file.
    """
    import torchvision  # noqa: PLC0415 - seconds to import; only the tests that convert need it

    torch.manual_seed(seed)
    tv = torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return tv.eval()
