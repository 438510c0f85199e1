"""The input grid: the normalised image on a signed integer grid, the only float step of an integer
network."""

from __future__ import annotations

import math

from labkit.train.data import input_normalisation, input_size


def input_range(cfg_or_data: dict | str) -> tuple[float, float]:
    """(lo, hi) of the normalised inputs: images in [0, 1] normalised by the dataset's mean and std.

    ``cfg_or_data``: a resolved config, its ``data`` section, or the dataset name (``embedded``,
    ``imagenet``).
    """
    data = cfg_or_data if isinstance(cfg_or_data, str) else cfg_or_data.get("data", cfg_or_data)
    means, stds = input_normalisation(data)
    return min((0 - m) / s for m, s in zip(means, stds)), max((1 - m) / s for m, s in zip(means, stds))


def input_shape_of(cfg: dict, batch: int = 1) -> tuple:
    """``(batch, 3, H, W)`` of the config's dataset (embedded: 32 px; ImageNet: ``data.image_size``, 224)."""
    size = input_size(cfg["data"])
    return (batch, 3, size, size)


def input_eps(lo: float, hi: float, bits: int = 8, pow2: bool = False) -> float:
    """Step of the signed ``bits`` grid (codes ``-2^(b-1) .. 2^(b-1)-1``, zero exact) covering ``[lo, hi]``;
    ``pow2`` rounds it up to a power of two."""
    half = 2 ** (bits - 1)
    eps = max(-float(lo) / half, float(hi) / (half - 1), 1e-12)
    return 2.0 ** math.ceil(math.log2(eps)) if pow2 else eps
