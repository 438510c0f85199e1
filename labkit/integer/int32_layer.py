"""One requantization in int32, as a 32-bit integer device (Deeploy's Generic platform) computes it.

Deeploy's RequantShift kernel runs ``y = clip(floor((x mul + add) / 2^d))``, one shift ``d`` per node, as

    t = x * mul;  t += add - h;  t += h;  y = clip(t >> d, lo, hi)        (h = 2^(d-1), 0 when d = 0)

with every partial sum in int32. It is exact when, for every input ``x`` the layer can receive,

    bound = max |x mul| + |add - h| + h  <=  2^31 - 1                      (covers |x mul| + |add| as well)

:func:`int32_requant` rounds the exact requantization (``mul``, ``add`` at shift ``d``, int64) to a shift
``d32 <= d``: ``mul32 = round(mul 2^(d32 - d))``, ``add32 = round(add 2^(d32 - d))`` (exact integers, half
up), keeping the bound on the input interval. Its precision is the proven **error**: the largest
``|(x mul32 + add32) / 2^d32 - (x mul + add) / 2^d|`` (codes) over the inputs whose exact output is not
clipped; a code can differ from the exact one only where the exact value lies within that error of a rounding
boundary. Three forms, all proven, all Deeploy nodes (docs/export.md measures them):

* **one shift** (one RequantShift): the channel with the largest ``|x| mul`` fixes ``d32`` for all.
* **shift groups** (:attr:`Int32Requant.groups`): channels grouped by their own largest safe shift, one
  RequantShift per group (the other channels' ``mul = add = 0``: code 0), the groups added; at most
  ``max_groups`` groups.
* **pre-clip** (:class:`PreClip`): the input saturated outside the window where the output clips anyway, so
  the bound covers the window (plus a step) instead of the whole proven interval: 2-3 more bits of shift on
  the 8-bit nets' wide accumulators, where groups gain nothing (one channel's own range is the limit).

Of the forms whose error is at most ``tolerance``, the one with the fewest Deeploy nodes is taken; when none
is, the most precise one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from labkit.integer.modules import IntegerizeError, Requant, _channel_view

__all__ = ["INT32_MAX", "Int32Requant", "PreClip", "int32_requant"]

INT32_MAX = 2 ** 31 - 1
#: defaults: the most shift groups per requantization, whether to pre-clip, the proven error (codes) below
#: which the form with the fewest nodes is taken (2^-10: a few more nodes where they buy precision; at 2^-7
#: one of 360 predictions of a PACT 8/8 net flipped, docs/export.md). 3 groups: at 2 one of 360 predictions of
#: a TQT 8/8 net (channels_last, 2 threads) flipped; 3 replace some pre-clips, so the nets take fewer nodes
MAX_GROUPS = 3
PRECLIP = True
TOLERANCE = 2.0 ** -10
#: multiplier bits that suffice: a channel gains nothing from more shift (groups merge such channels freely)
PRECISION = 20


def _half(d: int) -> int:
    return 1 << (d - 1) if d > 0 else 0


class Int32Requant(Requant):
    """:class:`Requant` computed as a 32-bit device does (module docstring); raises on an int32 overflow.

    ``d``: one shift, or one per channel (``shifts``); the channels that share a shift are a *group*, which
    the Deeploy export writes as one RequantShift node (:attr:`groups`). ``clip``: an optional
    :class:`PreClip` of the input."""

    def __init__(self, mul, add, d, lo, hi, eps_out, signed, n_levels, name: str = "",
                 proven: bool = True, clip: PreClip | None = None):
        shifts = torch.as_tensor(d, dtype=torch.int64)
        super().__init__(mul, add, int(shifts.min()), lo, hi, eps_out, signed, n_levels, reduce=False)
        self.register_buffer("shifts", shifts)
        if shifts.unique().numel() > 1:
            self.shift = None  # no single pure-shift form
        self.name, self.proven, self.clip = name, proven, clip

    @property
    def groups(self) -> list[tuple[int, list[int]]]:
        """``(shift, channels)`` per distinct shift, smallest first; one group ``(d, [])`` (all channels)
        when the shift is one value."""
        if self.shifts.dim() == 0 or self.shifts.unique().numel() == 1:
            return [(int(self.shifts.reshape(-1)[0]), [])]
        values = self.shifts.tolist()
        return [(v, [c for c, s in enumerate(values) if s == v]) for v in sorted(set(values))]

    def _check(self, peak: int) -> None:
        if peak > INT32_MAX:
            raise IntegerizeError(
                f"int32 requantization '{self.name}' overflows: a partial sum reached {peak} > 2^31-1 "
                + ("(a proven bound was violated: the input is not on the network's input grid)"
                   if self.proven else "(its calibrated bound does not hold for this input): use a larger "
                                       "margin, or no calibration for bounds proven on the whole input grid"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.numel():
            return x.clone()
        if self.clip is not None:
            x, peak = self.clip(x)
            self._check(peak)
        d = _channel_view(self.shifts, x)
        half = torch.where(d > 0, torch.ones_like(d) << (d - 1).clamp(min=0), torch.zeros_like(d))
        p = x * _channel_view(self.mul, x)
        t = p + _channel_view(self.add, x)
        self._check(max(int(p.abs().max()), int(t.abs().max()), int((t - half).abs().max())))
        return (t >> d).clamp_(self.lo, self.hi)

    def extra_repr(self) -> str:
        shifts = self.shifts.unique().tolist()
        groups = f", {len(shifts)} shift groups {shifts}" if len(shifts) > 1 else ""
        clip = f", pre-clip {self.clip.sides} (step 2^{self.clip.k})" if self.clip is not None else ""
        return super().extra_repr() + groups + clip


class PreClip(nn.Module):
    """Saturate a requantization's input outside the window where its output is clipped anyway, so that the
    multiplier sees a narrower range (a larger int32 shift). Per side, with per-channel ``top`` / ``bot``:

        e = clip(floor((x - top) / 2^k), 0, 255);  x = x - e 2^k      (x >= top  ->  top <= x < top + 2^k)
        e = clip(floor((bot - x) / 2^k), 0, 255);  x = x + e 2^k      (x <= bot  ->  bot - 2^k < x <= bot)

    ``x`` inside ``bot..top`` passes unchanged; ``k`` is the smallest step with ``e <= 255`` on the proven
    range. Each ``e`` is one RequantShift (``mul`` +-1, 256 unsigned levels), ``e 2^k`` one Mul, the update
    one Add; both sides read the unclipped ``x`` (they never act on the same value).
    """

    def __init__(self, k: int, top: torch.Tensor | None, bot: torch.Tensor | None):
        super().__init__()
        self.k = int(k)
        self.register_buffer("top", top)
        self.register_buffer("bot", bot)

    @property
    def sides(self) -> str:
        return "+".join(s for s, v in (("hi", self.top), ("lo", self.bot)) if v is not None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The clipped input and the largest partial sum of the device arithmetic (RequantShift adds and
        rounds: ``x - top - 2^(k-1)``, then ``+ 2^(k-1)``; the Mul; the Adds)."""
        h, peak, out = _half(self.k), int(x.abs().max()), x
        for edge, sign in ((self.top, 1), (self.bot, -1)):
            if edge is not None:
                s = sign * (x - _channel_view(edge, x))
                step = (s >> self.k).clamp_(0, 255) << self.k
                out = out - sign * step
                peak = max(peak, int((s - h).abs().max()), int(s.abs().max()), int(step.max()),
                           int(out.abs().max()))
        return out, peak


# ------------------------------------------------------------------------------------------ shifts
def _round_shift(v: int, k: int) -> int:
    """``round(v / 2^k)`` (half up) on exact integers; ``v 2^-k`` for ``k <= 0``."""
    return v << -k if k <= 0 else (v + (1 << (k - 1))) >> k


def _channels(t: torch.Tensor, n: int) -> list[int]:
    values = [int(v) for v in t.reshape(-1).tolist()]
    return values * n if len(values) == 1 else values


def _bound(mul: list[int], add: list[int], d: int, lo: list[int], hi: list[int]) -> int:
    h = _half(d)
    return max(max(abs(a * m), abs(b * m)) + abs(s - h) + h for m, s, a, b in zip(mul, add, lo, hi))


@dataclass
class _Channels:
    """One requantization's exact ``mul``/``add`` (shift ``d``) and input interval ``lo..hi``, per channel."""

    mul: list[int]
    add: list[int]
    lo: list[int]
    hi: list[int]
    d: int

    def at(self, chs: list[int], d32: int) -> tuple[list[int], list[int]]:
        """``mul``, ``add`` of channels ``chs`` rounded to the shift ``d32``."""
        return ([_round_shift(self.mul[c], self.d - d32) for c in chs],
                [_round_shift(self.add[c], self.d - d32) for c in chs])

    def bound(self, chs: list[int], d32: int) -> int:
        return _bound(*self.at(chs, d32), d32, [self.lo[c] for c in chs], [self.hi[c] for c in chs])

    def fit(self, chs: list[int], start: int) -> int:
        """The largest shift ``<= start`` at which every channel of ``chs`` stays inside int32; -1: none."""
        peak = max(max(abs(self.lo[c]), abs(self.hi[c])) * abs(self.mul[c]) + abs(self.add[c])
                   for c in chs)
        d32 = min(start, max(0, self.d - (peak.bit_length() - 31) + 2))  # the bound halves with each step
        while d32 >= 0 and self.bound(chs, d32) > INT32_MAX:
            d32 -= 1
        return d32

    def useful(self, c: int, d_c: int, precision: int) -> int:
        """The shift beyond which channel ``c``'s multiplier has more than ``precision`` significant bits
        (more shift gains nothing that matters), capped by its own largest shift ``d_c``."""
        if not self.mul[c]:
            return 0  # a constant output: any shift
        return min(d_c, self.d - (abs(self.mul[c]).bit_length() - precision))


def _stab(own: list[int], useful: list[int], loss: int) -> list[tuple[int, list[int]]]:
    """The fewest shifts such that every channel ``c`` gets one in ``useful[c] - loss .. own[c]`` (greedy
    interval stabbing, optimal): ``(shift, channels)`` per group."""
    left = sorted(range(len(own)), key=lambda c: own[c])
    groups = []
    while left:
        g = own[left[0]]
        members = [c for c in left if useful[c] - loss <= g]
        groups.append((g, members))
        left = [c for c in left if useful[c] - loss > g]
    return groups


def _group_shifts(ch: _Channels, name: str, max_groups: int, precision: int) -> list[int]:
    """One shift per channel, at most ``max_groups`` distinct values: each channel its largest safe shift,
    then channels merged into groups (a group's shift: the smallest of its members') so that no channel loses
    more multiplier bits below ``precision`` than the fewest groups allow."""
    n = len(ch.mul)
    own = [ch.fit([c], ch.d) for c in range(n)]
    if min(own) < 0:
        c = own.index(min(own))
        raise IntegerizeError(f"int32: requantization '{name}' overflows int32 even with d=0 (its input "
                              f"reaches {ch.lo[c]}..{ch.hi[c]} in channel {c}): use fewer bits for the "
                              "layers before it")
    useful = [ch.useful(c, own[c], precision) for c in range(n)]
    loss = 0
    while len(groups := _stab(own, useful, loss)) > max_groups:
        loss += 1
    shifts = [0] * n
    for g, members in groups:
        d_g = ch.fit(members, g)  # == g in practice; fit() re-checks the bound of the merged group
        for c in members:
            shifts[c] = d_g
    return shifts


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _window(ch: _Channels, lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Per channel ``top`` (every ``x >= top`` gives an exact output ``>= hi + 1``) and ``bot`` (every
    ``x <= bot`` gives ``<= lo - 1``), at most one beyond the channel's interval (then never clipped, as with
    ``mul <= 0``)."""
    top, bot = [], []
    for m, a, x_lo, x_hi in zip(ch.mul, ch.add, ch.lo, ch.hi):
        if m > 0:
            top.append(min(_ceil_div(((hi + 1) << ch.d) - a, m), x_hi + 1))
            bot.append(max((((lo - 1) << ch.d) - a) // m, x_lo - 1))
        else:
            top.append(x_hi + 1)
            bot.append(x_lo - 1)
    return top, bot


def _error(m: int, a: int, m32: int, a32: int, d: int, d32: int, x_lo: int, x_hi: int) -> float:
    """``max |(x m32 + a32) / 2^d32 - (x m + a) / 2^d|`` over ``x_lo..x_hi`` (codes): how far the int32
    requantization's value can be from the exact one before the floor (0 for an empty range)."""
    if x_lo > x_hi:
        return 0.0
    k = d - d32
    return max(abs(x * ((m32 << k) - m) + (a32 << k) - a) for x in (x_lo, x_hi)) / 2 ** d


def _clipped(ch: _Channels, sides: str, top: list[int], bot: list[int]) -> tuple[int, list[int], list[int]]:
    """The step ``k`` of a :class:`PreClip` on ``sides`` and the interval its output reaches, per channel."""
    spans = [h - t for h, t in zip(ch.hi, top)] * ("hi" in sides)
    spans += [b - lo for b, lo in zip(bot, ch.lo)] * ("lo" in sides)
    span = max(spans + [0])
    k = max(0, (span // 256).bit_length())  # span < 256 * 2^k
    lo_c, hi_c = list(ch.lo), list(ch.hi)
    for c in range(len(lo_c)):
        if "hi" in sides and hi_c[c] >= top[c]:
            lo_c[c], hi_c[c] = min(lo_c[c], top[c]), min(hi_c[c], top[c] + (1 << k) - 1)
        if "lo" in sides and lo_c[c] <= bot[c]:
            lo_c[c], hi_c[c] = max(lo_c[c], bot[c] - (1 << k) + 1), max(hi_c[c], bot[c])
    return k, lo_c, hi_c


def _clip_bound(ch: _Channels, sides: str, k: int, top: list[int], bot: list[int]) -> int:
    """The largest partial sum of a pre-clip's RequantShift / Mul / Add nodes."""
    h, peak = _half(k), max(max(abs(v) for v in ch.lo), max(abs(v) for v in ch.hi)) + (255 << k)  # the Adds
    for c in range(len(ch.mul)):
        if "hi" in sides:
            peak = max(peak, abs(ch.lo[c] - top[c]) + h, abs(ch.hi[c] - top[c]) + h)
        if "lo" in sides:
            peak = max(peak, abs(bot[c] - ch.lo[c]) + h, abs(bot[c] - ch.hi[c]) + h)
    return peak


@dataclass
class _Choice:
    """One way to requantize a layer in int32: pre-clip sides, shifts, rounded constants, proven error."""

    sides: str
    k: int
    top: list[int]
    bot: list[int]
    ch: _Channels  # the proven (or calibrated) interval
    clipped: _Channels  # the interval after the pre-clip
    shifts: list[int]
    mul32: list[int]
    add32: list[int]
    error: float  # proven max |(x mul32 + add32) / 2^d32 - (x mul + add) / 2^d| in the window, codes
    adder_input: bool = False  # an adder's input: its groups join the adder's sum

    @property
    def nodes(self) -> int:
        """Deeploy nodes: a RequantShift per shift group, the Adds that sum the groups and a RequantShift that
        makes the sum int8 again (an adder's input joins the adder's sum instead), three per pre-clip side."""
        groups, sides = len(set(self.shifts)), len([s for s in self.sides.split("+") if s])
        return (2 * groups - self.adder_input if groups > 1 else 1) + 3 * sides


def _choice(ch: _Channels, name: str, sides: str, top, bot, max_groups: int, precision: int) -> _Choice:
    k, lo_c, hi_c = _clipped(ch, sides, top, bot) if sides else (0, ch.lo, ch.hi)
    cc = _Channels(ch.mul, ch.add, lo_c, hi_c, ch.d)
    shifts = _group_shifts(cc, name, max_groups, precision)
    mul32, add32 = [], []
    for c, s in enumerate(shifts):
        m, a = cc.at([c], s)
        mul32 += m
        add32 += a
    error = _max_error(ch, mul32, add32, shifts, cc, top, bot)
    return _Choice(sides, k, top, bot, ch, cc, shifts, mul32, add32, error, ".acts." in name)


def _max_error(ch: _Channels, mul32, add32, shifts, clipped: _Channels, top, bot) -> float:
    """The proven error (module docstring) over every channel's window."""
    columns = zip(ch.mul, ch.add, mul32, add32, shifts, clipped.lo, clipped.hi, top, bot)
    return max(_error(m, a, m32, a32, ch.d, s, max(x, b), min(y, t)) for m, a, m32, a32, s, x, y, t,
               b in columns)


#: ``(channel, input value, exact output code)`` per point, int64 tensors (:func:`_match`)
Points = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def int32_requant(r: Requant, lo: torch.Tensor, hi: torch.Tensor, *, name: str = "", proven: bool = True,
                  max_groups: int = MAX_GROUPS, preclip: bool = PRECLIP, tolerance: float = TOLERANCE,
                  points: Points | None = None) -> tuple[Int32Requant, dict]:
    """One requantization ``r`` in int32 for inputs ``lo..hi`` (per channel or scalar), and its plan row: of
    the forms (module docstring; pre-clip sides only with ``preclip``, up to ``max_groups`` shift groups)
    whose proven error is at most ``tolerance`` the one with the fewest Deeploy nodes, else the most precise;
    then, with ``points``, each channel's constants moved within their rounding (:func:`_match`)."""
    if max_groups < 1:
        raise IntegerizeError(f"int32: max_groups must be >= 1 (shifts per requantization), got {max_groups}")
    n = max(r.mul.numel(), r.add.numel(), lo.numel(), hi.numel())
    ch = _Channels(*(_channels(t, n) for t in (r.mul, r.add, lo, hi)), r.d)
    top, bot = _window(ch, r.lo, r.hi)
    options = []
    for sides in ("", "hi", "lo", "hi+lo") if preclip else ("",):
        # a pre-clip must keep every partial sum in int32 and its saturation exact (error < 1 at the window)
        if sides and _clip_bound(ch, sides, _clipped(ch, sides, top, bot)[0], top, bot) > INT32_MAX:
            continue
        for groups in range(1, max_groups + 1):
            option = _choice(ch, name, sides, top, bot, groups, PRECISION)
            if not sides or option.error < 1:
                options.append(option)
            if len(set(option.shifts)) < groups:
                break  # more groups would not be used
    good = [o for o in options if o.error <= tolerance]
    best = min(good, key=lambda o: (o.nodes, o.error)) if good else \
        min(options, key=lambda o: (o.error, o.nodes))
    if not any(best.mul32):
        raise IntegerizeError(f"int32: requantization '{name}' rounds every multiplier to 0 (its input "
                              f"reaches {min(ch.lo)}..{max(ch.hi)}): use fewer bits for the layers before it")
    flat = _match(best, points, r.lo, r.hi) if points is not None else None
    return _module(name, r, best, proven), {**_plan_row(name, r, best, proven), "flat_pct": flat}


def _match(best: _Choice, points: Points, lo: int, hi: int) -> float:
    """Move each channel's ``mul32`` (by at most 2) and ``add32`` (within the int32 bound, the error below one
    code) so that its int32 codes equal the exact ones at as many ``points`` inside its window as possible
    (outside it both saturate alike), then as close to the rounded constants as possible; the proven error is
    recomputed. Returns the share (%) of the points matched."""
    chan, vals, codes = (t.numpy() for t in points)
    order = np.argsort(chan, kind="stable")
    starts = np.searchsorted(chan[order], np.arange(len(best.mul32) + 1))
    big, hits, total = 1 << 45, 0, 0
    for c, (m0, a0, s) in enumerate(zip(best.mul32, best.add32, best.shifts)):
        at = order[starts[c]:starts[c + 1]]
        v, y = vals[at], codes[at]
        keep = (v >= best.bot[c]) & (v <= best.top[c])
        v, y = v[keep], y[keep]
        low = np.where(y > lo, y << s, -big)  # x m + a >= y 2^s (unless y is the lowest code)
        high = np.where(y < hi, (y + 1) << s, big) - 1  # x m + a < (y + 1) 2^s (unless the highest)
        total += len(v)
        now = int(((v * m0 + a0 >= low) & (v * m0 + a0 <= high)).sum())
        if now == len(v):
            hits += now
            continue
        x_lo, x_hi = best.clipped.lo[c], best.clipped.hi[c]
        options = [(-now, 0, 0, m0, a0)]
        for m in range(m0 - 2, m0 + 3):
            count, a = _most_covered(low - v * m, high - v * m, a0)
            if _bound([m], [a], s, [x_lo], [x_hi]) <= INT32_MAX and _error(
                    best.ch.mul[c], best.ch.add[c], m, a, best.ch.d, s, max(x_lo, best.bot[c]),
                    min(x_hi, best.top[c])) < 1:  # the saturation beyond the window stays exact
                options.append((-count, abs(m - m0), abs(a - a0), m, a))
        count, _, _, best.mul32[c], best.add32[c] = min(options)
        hits -= count
    best.error = _max_error(best.ch, best.mul32, best.add32, best.shifts, best.clipped, best.top, best.bot)
    return 100.0 * hits / total if total else 100.0


def _most_covered(starts: np.ndarray, ends: np.ndarray, near: int) -> tuple[int, int]:
    """``(n, a)``: the most intervals ``starts[i]..ends[i]`` that one integer lies in, and the integer closest
    to ``near`` among those lying in ``n`` (``near`` itself with no interval)."""
    keep = starts <= ends
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return 0, near
    edges = np.concatenate([starts, ends + 1])
    steps = np.concatenate([np.ones_like(starts), -np.ones_like(ends)])
    order = np.lexsort((steps, edges))  # at one edge: closings before openings
    edges, cover = edges[order], np.cumsum(steps[order])
    n = int(cover.max())
    at = np.flatnonzero(cover == n)  # the segments edges[i] .. edges[i + 1] - 1 covered n times
    a = np.minimum(np.maximum(near, edges[at]), edges[at + 1] - 1)
    return n, int(a[np.abs(a - near).argmin()])


def _module(name: str, r: Requant, best: _Choice, proven: bool) -> Int32Requant:
    clip = None
    if best.sides:
        clip = PreClip(best.k, torch.tensor(best.top) if "hi" in best.sides else None,
                       torch.tensor(best.bot) if "lo" in best.sides else None)
    one = len(set(best.shifts)) == 1
    if one and len(set(best.mul32)) == len(set(best.add32)) == 1 and r.mul.dim() == 0 and r.add.dim() == 0 \
            and clip is None:  # scalar stays scalar
        return Int32Requant(torch.tensor(best.mul32[0]), torch.tensor(best.add32[0]), best.shifts[0], r.lo,
                            r.hi, r.eps_out, r.signed, r.n_levels, name=name, proven=proven)
    return Int32Requant(torch.tensor(best.mul32), torch.tensor(best.add32),
                        best.shifts[0] if one else torch.tensor(best.shifts), r.lo, r.hi, r.eps_out, r.signed,
                        r.n_levels, name=name, proven=proven, clip=clip)


def _plan_row(name: str, r: Requant, c: _Choice, proven: bool) -> dict:
    bound = max(_bound([m], [a], d, [x], [y])
                for m, a, d, x, y in zip(c.mul32, c.add32, c.shifts, c.clipped.lo, c.clipped.hi))
    if c.sides:
        bound = max(bound, _clip_bound(c.ch, c.sides, c.k, c.top, c.bot))
    nonzero = [abs(m) for m in c.mul32 if m]
    return {"layer": name, "bounds": "proven" if proven else "calibrated", "acc_lo": min(c.ch.lo),
            "acc_hi": max(c.ch.hi), "d": r.d, "d32": min(c.shifts), "d32_max": max(c.shifts),
            "groups": len(set(c.shifts)), "preclip": c.sides, "nodes": c.nodes,
            "mul_bits": round(math.log2(min(nonzero)), 2) if nonzero else 0.0, "error": c.error,
            "bound": bound,
            "headroom": INT32_MAX - bound, "headroom_bits": round(math.log2(INT32_MAX / max(bound, 1)), 3)}
