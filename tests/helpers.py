"""Shared constants and config helpers of the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from labkit.precision.bitplan import BitPlan
from labkit.precision.sensitivity import Sensitivity
from labkit.quant.recipe import pact_recipe

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_FP32 = ROOT / "configs" / "embedded" / "config.fp32.json"


def tiny_overrides(**extra) -> dict:
    """A quick embedded run: 256 train / 120 valid images, 2 epochs, no dropout or augmentation."""
    overrides = {
        "data.train.dataset.limit": 256,
        "data.valid.dataset.limit": 120,
        "data.train.dataloader.bs": 32,
        "data.train.dataset.transform.kwargs.augment": False,
        "network.kwargs.dropout": 0.0,
        "training.n_epochs": 2,
        "training.gd.lr_sched": {"class": "HandScheduler", "kwargs": {"schedule": {"0": 1, "1": 0.5}}},
        "training.gd.opt.kwargs.lr": 0.02,
    }
    overrides.update(extra)
    return overrides


class SmallNet(nn.Module):
    """stem conv -> ReLU6 -> conv + skip (an integer adder) -> conv -> ReLU6 -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU6()
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        return self.fc(self.flatten(self.pool(self.act3(self.bn3(self.conv3(x))))))


SMALL_QUANTIZE = {"PACTConv2d": {"kwargs": {"n_levels": 256}, "conv1$": {}, "conv2$": {}, "conv3$": {}},
                  "PACTLinear": {"fc$": {"n_levels": 256}},
                  "PACTUnsignedAct": {"act1$": {}, "act3$": {}}, "harmonize": {}}
SMALL_INPUT = (1, 3, 6, 6)


def small_qnet(net: nn.Module | None = None):
    """:class:`SmallNet` (or ``net``) fake-quantized and harmonized: 4 layers, 3 activation groups."""
    qnet, _ = pact_recipe(net or SmallNet(), SMALL_QUANTIZE)
    return qnet


def small_plan(qnet=None):
    return BitPlan(qnet or small_qnet(), SMALL_INPUT)


def random_sensitivity(plan: BitPlan, bits, seed: int) -> Sensitivity:
    """Decreasing in bits, like measured ones, with a random scale per layer (some slightly negative)."""
    rng = random.Random(seed)

    def curve():
        scale = rng.uniform(0.01, 2.0)
        return {b: scale * rng.uniform(0.5, 1.5) * 2.0 ** -b - rng.uniform(0, 0.002) for b in bits}

    return Sensitivity(tuple(bits), 8, 0.1, {n: curve() for n in plan.w_bits},
                       {g: curve() for g in plan.activation_groups()}, "synthetic", "synthetic")


def make_imagefolder(root, classes=("cat", "dog", "eel"), per_class=3, size=40, val_classes=None):
    """An ImageNet-shaped folder (train/ and val/, one sub-folder of random JPEGs per class)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in (val_classes or classes) if split == "val" else classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root
