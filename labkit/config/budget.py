r"""Budgets of a bit allocation: limits on the totals of :mod:`labkit.precision.costs`, parsed and checked
without torch.

A budget maps a total to a limit: ``weight_bytes``, ``act_bytes`` (per sample) or ``BOPs``. A limit is a
number (``24000``, ``2.5e8``) or ``uniform:B`` / ``uniform:W/A``: what the base config costs with every
layer's weights at W bits and every activation at A bits (B: both), resolved against the plan by
:func:`labkit.precision.allocate.resolve_budget`. Spelled ``KEY=LIMIT`` (one per ``--budget``, or
comma-separated)::

    weight_bytes=uniform:3,BOPs=uniform:3

A budget may also state structural limits, ``min_bits:SELECTOR=B``: the weights of every layer the selector
names get at least B bits and so do the activations it reads (the input stays at its own bits), and an
activation quantizer it names gets at least B bits. ``SELECTOR`` is ``first`` (the first conv), ``last`` (the
classifier) or a module-name regex matched from the start (``classifier`` names ``classifier.1``,
``features\.17\.2$`` one activation)::

    weight_bytes=uniform:3,act_bytes=uniform:3,min_bits:last=4
"""

from __future__ import annotations

import difflib
import math
import re

from labkit.config.errors import LabkitError
from labkit.config.spec import MAX_BITS, MIN_BITS

#: the totals a budget can limit (names as in :data:`labkit.precision.costs.TOTALS`)
METRICS = ("weight_bytes", "act_bytes", "BOPs")
EXAMPLE = "weight_bytes=uniform:3,BOPs=uniform:3"
#: the per-layer sensitivity measures a plan can be proposed from (labkit.precision.sensitivity)
SENSITIVITY_METHODS = ("loss", "fisher")
SENSITIVITY_METHOD = SENSITIVITY_METHODS[0]  # the default
MIN_BITS_KEY = "min_bits:"  # a structural limit: min_bits:SELECTOR=B


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
        if str(metric).startswith(MIN_BITS_KEY):
            selector = _selector(str(metric))
            if MIN_BITS_KEY + selector in out:
                raise BudgetError(f"budget '{metric}' is given twice: give each selector one minimum")
            out[MIN_BITS_KEY + selector] = _bits(str(metric), limit)
            continue
        if metric not in METRICS:
            close = difflib.get_close_matches(str(metric), METRICS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BudgetError(f"budget metric '{metric}' is unknown{hint}: use {', '.join(METRICS)}")
        if metric in out:
            raise BudgetError(f"budget metric '{metric}' is given twice: give each metric one limit")
        out[metric] = _limit(metric, limit)
    if not budget_limits(out):
        raise BudgetError("the budget has structural limits only: give at least one METRIC=LIMIT too, e.g. "
                          f"{EXAMPLE}")
    return out


def budget_limits(spec: dict) -> dict:
    """The cost limits of a parsed budget: ``{metric: limit}`` without its structural limits."""
    return {k: v for k, v in spec.items() if not k.startswith(MIN_BITS_KEY)}


def budget_floors(spec: dict) -> dict[str, int]:
    """The structural limits of a parsed budget: ``{selector: minimum bits}``."""
    return {k[len(MIN_BITS_KEY):]: v for k, v in spec.items() if k.startswith(MIN_BITS_KEY)}


def _selector(key: str) -> str:
    selector = key[len(MIN_BITS_KEY):].strip()
    if not selector:
        raise BudgetError(f"budget '{key}' names no layer: write min_bits:SELECTOR=B with first, last or a "
                          "module name regex, e.g. min_bits:last=4")
    if selector not in ("first", "last"):
        try:
            re.compile(selector)
        except re.error as err:
            raise BudgetError(f"budget '{key}': '{selector}' is not a regex ({err}); use first, last or a "
                              "module name regex, e.g. features\\.17") from None
    return selector


def _limit(metric: str, limit) -> float | tuple[int, int]:
    if isinstance(limit, (tuple, list)) and len(limit) == 2:
        return _bits(metric, limit[0]), _bits(metric, limit[1])
    text = str(limit).strip()
    if text.startswith("uniform:"):
        bits = text.removeprefix("uniform:").split("/")
        if len(bits) not in (1, 2):
            raise BudgetError(
                f"budget {metric}={text}: write uniform:B or uniform:W/A (bits), e.g. uniform:3"
            )
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
    """Sorted distinct bit-widths from MIN_BITS to MAX_BITS (the candidates of a sensitivity or an
    allocation), else :class:`BudgetError` naming ``what``."""
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
    """The canonical spelling, which :func:`parse_budget` reads back: ``weight_bytes=uniform:3,BOPs=2500``
    (structural limits as ``min_bits:last=4``)."""
    return ",".join(f"{k}={_show(v, 'uniform:', '/', '{:.0f}')}" for k, v in budget_limits(spec).items()) + \
        "".join(f",{MIN_BITS_KEY}{k}={b}" for k, b in budget_floors(spec).items())


def describe_budget(spec: dict) -> str:
    """For titles and descriptions: ``weight_bytes<=uniform:3, BOPs<=250,000,000`` (and ``last>=4 bits``)."""
    return ", ".join([f"{k}<={_show(v, 'uniform:', '/', '{:,.0f}')}" for k, v in budget_limits(spec).items()]
                     + [f"{k}>={b} bits" for k, b in budget_floors(spec).items()])


def budget_slug(spec: dict) -> str:
    """For file names: ``weight_bytes-u3_BOPs-250000000`` (``u2-4``: uniform W2/A4; ``min-last-4``: a
    structural limit, its regex reduced to letters, digits, dots and dashes)."""
    floors = [f"min-{re.sub(r'[^A-Za-z0-9.-]+', '', k)}-{b}" for k, b in budget_floors(spec).items()]
    return "_".join([f"{k}-{_show(v, 'u', '-', '{:.0f}')}" for k, v in budget_limits(spec).items()] + floors)


def _show(limit, prefix: str, sep: str, number: str) -> str:
    if isinstance(limit, tuple):
        return f"{prefix}{limit[0]}" if limit[0] == limit[1] else f"{prefix}{limit[0]}{sep}{limit[1]}"
    return number.format(limit)
