"""Shared constants and config helpers of the tests (fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
