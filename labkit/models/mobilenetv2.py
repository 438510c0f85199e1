"""MobileNetV2 with the reference framework's module names.

Layout (names are the contract with per-layer configs):
``pilot.{0,1,2}`` stem conv/BN/ReLU6; ``features.0`` .. ``features.16`` inverted residual blocks, each
with ``residual_branch.K.{0,1,2}``; ``features.17`` the 1x1 head ConvBNReLU6; ``avgpool``, ``flatten``,
``classifier.{0: Dropout, 1: Linear}``.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), one row per stage.
_STAGES = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]

# Stem stride followed by the first stride of each of the 7 stages.
#   standard: total stride 32 (ImageNet, 224 px -> 7x7 final map).
#   small:    total stride 8 (32 px inputs -> 4x4 final map), for the embedded default.
STRIDE_TABLES = {
    "standard": (2, 1, 2, 2, 2, 1, 2, 1),
    "small": (1, 1, 1, 2, 2, 1, 2, 1),
}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (>= divisor), never losing >= 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
            relu6: bool = True) -> nn.Sequential:
    """``Sequential(Conv2d(bias=False, padding=(k-1)//2), BatchNorm2d[, ReLU6])`` -> names ``.0 .1 .2``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """``y = x + residual_branch(x)`` when stride 1 and in == out channels, else ``residual_branch(x)``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_ch * expansion))
        layers = []
        if expansion != 1:
            layers.append(conv_bn(in_ch, hidden, 1))
        layers.append(conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))
        layers.append(conv_bn(hidden, out_ch, 1, relu6=False))
        self.residual_branch = nn.Sequential(*layers)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_skip:
            return x + self.residual_branch(x)
        return self.residual_branch(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018). ``capacity`` is the width multiplier; ``config`` the stride table.

    3,504,872 parameters at ``capacity=1.0, num_classes=1000``, like torchvision's ``mobilenet_v2``.
    """

    def __init__(self, capacity: float = 1.0, num_classes: int = 1000, config: str = "standard",
                 dropout: float = 0.2, seed: int | None = None):
        super().__init__()
        if config not in STRIDE_TABLES:
            raise ValueError(f"unknown MobileNetV2 config {config!r}: choose one of {sorted(STRIDE_TABLES)}")
        if capacity <= 0:
            raise ValueError(f"MobileNetV2 capacity must be > 0, got {capacity}")
        if seed is not None and seed >= 0:
            torch.manual_seed(seed)
        self.capacity, self.num_classes, self.config = capacity, num_classes, config
        stem_stride, *stage_strides = STRIDE_TABLES[config]

        in_ch = make_divisible(32 * capacity)
        self.pilot = conv_bn(3, in_ch, 3, stride=stem_stride)
        blocks = []
        for (expansion, channels, repeats), first_stride in zip(_STAGES, stage_strides):
            out_ch = make_divisible(channels * capacity)
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, first_stride if i == 0 else 1, expansion))
                in_ch = out_ch
        self.last_channels = make_divisible(1280 * max(1.0, capacity))
        blocks.append(conv_bn(in_ch, self.last_channels, 1))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs, unit BN, N(0, 0.01) classifier, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pilot(x)
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)
