"""Requantization parameters: a real-valued affine map of integer codes as integer ``mul``, ``add`` and shift
``d``.

A requantization turns an integer ``x`` (an accumulator, or codes) whose real value is ``scale * x + shift``
into codes of a grid with step ``eps_out``::

    y = clip(floor((x * mul + add) / 2^d), lo, hi),   mul = round(2^d scale / eps_out),
                                                      add = round(2^d (shift / eps_out + 1/2))

(the rounding half-step once, in ``add``). ``d`` is the largest value (at most ``d_max``) that keeps the
worst case ``|x * mul| + |add|`` below ``2^(EXACT_BITS - 1)`` for every ``|x| <= bound``: exact in int64 and
in float64 (the ONNX export computes in double).
"""

from __future__ import annotations

import math

import torch

from labkit.config.spec import EXACT_BITS
from labkit.integer.modules import IntegerizeError


def requant_params(ratio: torch.Tensor, offset: torch.Tensor, bound: torch.Tensor, d: int | None, d_max: int,
                   where: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(mul, add, d)`` for ``y = floor(x * ratio + offset)`` with ``|x| <= bound`` (per channel or scalar);
    ``d`` None: the largest exact one (module docstring)."""
    peak = float((bound * ratio.abs()).max() + offset.abs().max()) + 1.0
    if d is None:
        d = max(1, min(d_max, math.floor(EXACT_BITS - 1 - math.log2(peak))))
    mul = torch.round(ratio * 2.0 ** d)
    add = torch.round(offset * 2.0 ** d)
    worst = float((bound * mul.abs()).max() + add.abs().max())
    if worst >= 2.0 ** 62:
        raise IntegerizeError(f"integerize: requantization '{where}' overflows int64 with d={d} (worst case "
                              f"|acc*mul|+|add| = 2^{math.log2(worst):.1f}); use a smaller d or d=None")
    if mul.abs().max() == 0:
        raise IntegerizeError(f"integerize: requantization '{where}' rounds its multiplier to 0 with d={d}; "
                              "use a larger d or d=None")
    return mul, add, d
