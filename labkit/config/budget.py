"""Budgets of a bit allocation: limits on the totals of :mod:`labkit.precision.costs`, parsed and checked without torch.

A budget maps a total to a limit: ``weight_bytes``, ``act_bytes`` (per sample) or ``BOPs``. A limit is a number
(``24000``, ``2.5e8``) or ``uniform:B`` / ``uniform:W/A``: what the base config costs with every layer's
weights at W bits and every activation at A bits (B: both), resolved against the plan by
:func:`labkit.precision.allocate.resolve_budget`. Spelled ``KEY=LIMIT`` (one per ``--budget``, or comma-separated)::

    weight_bytes=uniform:3,BOPs=uniform:3
"""

from __future__ import annotations

import difflib
import math

from labkit.config.errors import LabkitError
from labkit.config.spec import MAX_BITS, MIN_BITS

#: the totals a budget can limit (names as in :data:`labkit.precision.costs.TOTALS`)
METRICS = ("weight_bytes", "act_bytes", "BOPs")
EXAMPLE = "weight_bytes=uniform:3,BOPs=uniform:3"


class BudgetError(LabkitError, ValueError):
    """A budget that cannot be read or met; the message names the metric and the fix."""


def parse_budget(spec) -> dict[str, float | tuple[int, int]]:
    """``"weight_bytes=uniform:3,BOPs=2e8"`` (or a list of such strings, or a dict ``{metric: limit}``) ->
    ``{"weight_bytes": (3, 3), "BOPs": 2e8}``: a limit is a positive number or ``(w_bits, a_bits)``."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = [spec] if isinstance(spec, str) else list(spec or [])
        items = []
        for part in (p.strip() for text in parts for p in str(text).split(",")):
            if not part:
                continue
            if "=" not in part:
                raise BudgetError(f"budget '{part}' has no '=': write METRIC=LIMIT, e.g. {EXAMPLE}")
            items.append(tuple(s.strip() for s in part.split("=", 1)))
    if not items:
        raise BudgetError(f"the budget is empty: give at least one METRIC=LIMIT, e.g. {EXAMPLE}")
    out: dict[str, float | tuple[int, int]] = {}
    for metric, limit in items:
        if metric not in METRICS:
            close = difflib.get_close_matches(str(metric), METRICS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BudgetError(f"budget metric '{metric}' is unknown{hint}: use {', '.join(METRICS)}")
        if metric in out:
            raise BudgetError(f"budget metric '{metric}' is given twice: give each metric one limit")
        out[metric] = _limit(metric, limit)
    return out


def _limit(metric: str, limit) -> float | tuple[int, int]:
    if isinstance(limit, (tuple, list)) and len(limit) == 2:
        return _bits(metric, limit[0]), _bits(metric, limit[1])
    text = str(limit).strip()
    if text.startswith("uniform:"):
        bits = text.removeprefix("uniform:").split("/")
        if len(bits) not in (1, 2):
            raise BudgetError(f"budget {metric}={text}: write uniform:B or uniform:W/A (bits), e.g. uniform:3")
        w = _bits(metric, bits[0])
        return w, _bits(metric, bits[-1])
    try:
        value = float(text) if not isinstance(limit, bool) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {metric}={text} is not a limit: give a positive number (e.g. 24000) or "
                          "uniform:B, the cost of the plan with every layer at B bits")
    return value


def _bits(metric: str, text) -> int:
    try:
        bits = int(str(text).strip())
    except ValueError:
        bits = None
    if bits is None or not MIN_BITS <= bits <= MAX_BITS:
        raise BudgetError(f"budget {metric}: '{text}' is not a bit-width from {MIN_BITS} to {MAX_BITS} "
                          "(uniform:B or uniform:W/A)")
    return bits


def bit_choices(bits, what: str = "bits") -> tuple[int, ...]:
    """Sorted distinct bit-widths from MIN_BITS to MAX_BITS (the candidates of a sensitivity or an allocation),
    else :class:`BudgetError` naming ``what``."""
    listed = [bits] if isinstance(bits, (str, int)) else list(bits or [])
    try:
        out = tuple(sorted({int(b) for b in listed if not isinstance(b, bool)}))
    except (TypeError, ValueError):
        out = ()
    if not out or len(out) != len(listed) or not all(MIN_BITS <= b <= MAX_BITS for b in out):
        raise BudgetError(f"{what} {' '.join(map(str, listed))}: give distinct bit-widths from {MIN_BITS} to "
                          f"{MAX_BITS}, e.g. 2 3 4 8")
    return out


def format_budget(spec: dict) -> str:
    """The canonical spelling, which :func:`parse_budget` reads back: ``weight_bytes=uniform:3,BOPs=250000000``."""
    return ",".join(f"{k}={_show(v, 'uniform:', '/', '{:.0f}')}" for k, v in spec.items())


def describe_budget(spec: dict) -> str:
    """For titles and descriptions: ``weight_bytes<=uniform:3, BOPs<=250,000,000``."""
    return ", ".join(f"{k}<={_show(v, 'uniform:', '/', '{:,.0f}')}" for k, v in spec.items())


def budget_slug(spec: dict) -> str:
    """For file names: ``weight_bytes-u3_BOPs-250000000`` (``u2-4``: uniform W2/A4)."""
    return "_".join(f"{k}-{_show(v, 'u', '-', '{:.0f}')}" for k, v in spec.items())


def _show(limit, prefix: str, sep: str, number: str) -> str:
    if isinstance(limit, tuple):
        return f"{prefix}{limit[0]}" if limit[0] == limit[1] else f"{prefix}{limit[0]}{sep}{limit[1]}"
    return number.format(limit)
