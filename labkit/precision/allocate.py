"""Bit allocation: the per-layer bits that minimise the summed sensitivity under a budget, solved exactly.

**Model.** Choose for every quantized conv/linear l a weight bit-width ``w_l`` in W and for every activation
group g an activation bit-width ``a_g`` in A, minimising the predicted loss increase
(:mod:`labkit.precision.sensitivity`)

    S = sum_l s_w(l, w_l) + sum_g s_a(g, a_g)

subject to each budgeted total of :mod:`labkit.precision.costs` (exactly what :meth:`BitPlan.totals`
computes):

    weight_bytes = sum_l weight_bytes(params_l, w_l, bias_l)                              <= B_w
    act_bytes    = act_bytes(input, 8) + sum_g sum_{q in g} act_bytes(elements_q, a_g)     <= B_a
    BOPs         = sum_l bops(macs_l, w_l, bits of the quantizer l reads)                  <= B_BOPs

**Ties (harmonization).** One choice per activation group (:meth:`BitPlan.activation_groups`): an integer
adder's inputs share one grid so their codes add, and its output takes the same ``n_levels`` (one per
``PACTIntegerAdd``); a quantizer that only requantizes another's codes (the pool requantizer after the last
activation) takes that one's bits; the input quantizer keeps its bits. Nothing else must tie: every other
boundary between quantizers is an integer requantization (mul/add/shift), which maps any grid to any grid, and
a layer's weight bits do not constrain its neighbours'.

**Solver.** A 0/1 integer program: one-hot ``x[l, w]``, ``y[g, a]``; the BOPs products ``x[l, w] y[g, a]``
become ``z[l, w, a] >= 0`` with ``sum_a z[l, w, a] = x[l, w]`` and ``sum_w z[l, w, a] = y[g, a]`` (for one-hot
x and y the only solution is z = x y, and the relaxation stays tight). HiGHS
(:func:`scipy.optimize.milp`) solves it to a zero relative gap, so the result is optimal for this model up to
the solver's absolute gap (1e-6, with the objective scaled so that the largest sensitivity is 1e4: 1e-10 of
it); a test compares it with brute force. An
assignment that misses a budget only within the solver's feasibility tolerance is cut off and the program
solved again, so the returned plan always meets the budget as :mod:`labkit.precision.costs` counts it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from labkit.config.budget import (
    MIN_BITS_KEY,
    SENSITIVITY_METHOD,
    BudgetError,
    bit_choices,
    budget_floors,
    budget_limits,
    describe_budget,
    parse_budget,
)
from labkit.config.tables import Table
from labkit.precision.bitplan import FLOAT, INPUT, BitPlan
from labkit.precision.costs import act_bytes, bops, weight_bytes
from labkit.precision.sensitivity import DEFAULT_BITS, Sensitivity, measure_sensitivity

MAX_CUTS = 50
OBJECTIVE_SCALE = 1e4
#: structural limits :func:`propose` adds unless the budget states them: the first conv's weights at 8 bits
#: (it reads the 8-bit input; 0.1% of the embedded network's weights), the classifier's weights and the
#: activations it reads (the last feature activation and the pool requantizer) at 4 bits at least
DEFAULT_FLOORS = {"first": 8, "last": 4}


@dataclass
class Allocation:
    """A proposed plan: ``plan`` (a :class:`BitPlan` with the chosen bits), the resolved ``budget``
    ``{metric: limit}``, its ``totals`` and the predicted loss increase ``objective`` (sum of
    sensitivities)."""

    plan: BitPlan
    spec: dict
    budget: dict[str, int]
    objective: float
    totals: dict
    sensitivity: Sensitivity
    w_choices: tuple[int, ...]
    a_choices: tuple[int, ...]
    weight_scale: float = 1.0
    #: how the plan was chosen among candidates, when it was (labkit.lab.probe)
    chosen_by: str = ""

    def description(self) -> str:
        base = getattr(self.plan, "base_config", {}).get("name", "the base config")
        scaled = f", the weights' sensitivities x{self.weight_scale:g}" if self.weight_scale != 1 else ""
        return (f"Proposed mixed precision ({self.plan.describe()}) for {describe_budget(self.spec)}; the "
                "bits that minimise the summed per-layer sensitivity (labkit.precision.allocate; "
                f"{self.sensitivity.method} method on {self.sensitivity.n_calib} training images of "
                f"{self.sensitivity.checkpoint}{scaled}){self.chosen_by}, edited from {base}")

    def config(self, description: str | None = None) -> dict:
        """The base config with the proposal's bits in its per-layer entries (:meth:`BitPlan.apply_to`)."""
        return self.plan.apply_to(self.plan.base_config, description or self.description())

    def save(self, path: str | Path) -> Path:
        return self.plan.save(self.plan.base_config, path, self.description())

    def summary(self) -> str:
        used = ", ".join(f"{k} {self.totals[k]:,} of {v:,} ({100 * self.totals[k] / v:.1f}%)"
                         for k, v in self.budget.items())
        return (f"proposed {self.plan.describe()} for {describe_budget(self.spec)}: {used}; predicted "
                f"calibration-loss increase {self.objective:+.4f} (sum of per-layer sensitivities)")

    def table(self) -> Table:
        """Per layer: kind, weight bits and their sensitivity, output quantizer, its bits and sensitivity."""
        s = self.sensitivity
        rows = []
        for r in self.plan.rows:
            group = self.plan.leader(r.act) if r.act else None
            rows.append({"layer": r.name, "kind": r.kind, "w_bits": r.w_bits,
                         "s_w": s.weights[r.name][r.w_bits],
                         "output": r.act or "", "a_bits": r.a_bits,
                         "s_a": s.activations[group][r.a_bits] if group in s.activations else None})
        return Table(rows, title=self.summary())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __repr__(self) -> str:
        return self.summary()

    def __str__(self) -> str:
        return str(self.table())


def propose(cfg: dict, budget, checkpoint: str | Path | None = None, bits=DEFAULT_BITS, w_bits=None,
            a_bits=None,
            n_calib: int = 256, progress: bool = False, method: str = SENSITIVITY_METHOD) -> Allocation:
    """Measure (or read the cached) sensitivity of PACT/TQT config ``cfg`` with the weights of ``checkpoint``
    (default ``network.pretrained``) at ``bits`` by ``method`` (:data:`labkit.precision.sensitivity.METHODS`),
    and allocate bits (``w_bits`` / ``a_bits``: the allowed choices, default ``bits``) under ``budget``
    (:func:`labkit.config.budget.parse_budget`) and the structural limits of :data:`DEFAULT_FLOORS` that the
    budget does not set itself. A budget that no plan of the allowed
    bits meets is refused (:class:`BudgetError`) before anything is measured."""
    bits = bit_choices(bits)
    w_choices = _choices(w_bits, bits, "weight")
    a_choices = _choices(a_bits, bits, "activation")
    spec = with_default_floors(parse_budget(budget), max(w_choices + a_choices))
    plan = BitPlan.from_config(cfg)
    _check_feasible(plan, resolve_budget(plan, spec), *allowed_bits(plan, spec, w_choices, a_choices))
    sensitivity = measure_sensitivity(cfg, checkpoint, bits, n_calib, progress=progress, method=method)
    return allocate(plan, sensitivity, spec, w_bits, a_bits)


def with_default_floors(spec: dict, most_bits: int = max(DEFAULT_BITS)) -> dict:
    """``spec`` with each structural limit of :data:`DEFAULT_FLOORS` it does not state (at most ``most_bits``,
    the most any choice allows); a budget overrides a default by stating it, e.g. ``min_bits:last=2``."""
    stated = budget_floors(spec)
    return {**spec, **{f"{MIN_BITS_KEY}{k}": min(b, most_bits) for k,
                       b in DEFAULT_FLOORS.items() if k not in stated}}


def resolve_budget(plan: BitPlan, spec: dict) -> dict[str, int]:
    """Limits as numbers: ``uniform:W/A`` becomes the total of ``plan`` with every layer at W/A bits."""
    return {metric: int(uniform_totals(plan, *limit)[metric] if isinstance(limit, tuple) else limit)
            for metric, limit in budget_limits(parse_budget(spec)).items()}


def allowed_bits(plan: BitPlan, spec: dict, w_choices: tuple, a_choices: tuple) -> tuple[dict, dict]:
    """``(per layer, per activation group)``: the allowed bits that meet the budget's structural limits
    (:func:`labkit.config.budget.budget_floors`; ``first``: the first layer, ``last``: the last, else layers
    and activation quantizers whose names the regex matches from the start). A named layer's weights and the
    group of the quantizer it reads (not the input) take at least the limit; so does a named quantizer's
    group."""
    groups = plan.activation_groups()
    w_min = dict.fromkeys(plan.w_bits, 0)
    a_min = dict.fromkeys(groups, 0)
    layers = [g.name for g in plan.layers]
    for selector, b in budget_floors(parse_budget(spec)).items():
        named = {"first": layers[:1], "last": layers[-1:]}.get(selector)
        quantizers = []
        if named is None:
            named = [n for n in layers if re.match(selector, n)]
            quantizers = [q for q in plan.a_bits if q not in (INPUT, FLOAT) and re.match(selector, q)]
        if not named and not quantizers:
            raise BudgetError(
                f"budget min_bits:{selector} names no layer or activation of this network "
                f"(layers {layers[0]} ... {layers[-1]}): use first, last or a module name regex"
            )
        reads = [g.input for g in plan.layers if g.name in named and g.input not in (INPUT, FLOAT)]
        for n in named:
            w_min[n] = max(w_min[n], b)
        for q in reads + quantizers:
            a_min[plan.leader(q)] = max(a_min[plan.leader(q)], b)
    w_allowed = {n: tuple(c for c in w_choices if c >= m) for n, m in w_min.items()}
    a_allowed = {g: tuple(c for c in a_choices if c >= m) for g, m in a_min.items()}
    for what, allowed, minimum, choices in (("weights of", w_allowed, w_min, w_choices),
                                             ("activation", a_allowed, a_min, a_choices)):
        empty = next((n for n, c in allowed.items() if not c), None)
        if empty is not None:
            raise BudgetError(f"budget: the {what} '{empty}' must take at least {minimum[empty]} bits, but "
                              f"the allowed bits are {', '.join(map(str, choices))}: allow more bits or "
                              "lower the limit")
    return w_allowed, a_allowed


def uniform_totals(plan: BitPlan, w_bits: int, a_bits: int) -> dict:
    """:meth:`BitPlan.totals` of ``plan`` with every weight at ``w_bits`` and every activation at
    ``a_bits``."""
    uniform = copy.deepcopy(plan)
    uniform.set_all(w_bits, a_bits)
    return uniform.totals()


def predicted_increase(plan: BitPlan, sensitivity: Sensitivity) -> float:
    """The model's loss increase of ``plan``: the sum of its layers' and groups' sensitivities."""
    return sum(sensitivity.weights[n][b] for n, b in plan.w_bits.items()) + \
        sum(sensitivity.activations[g][plan.a_bits[g]] for g in plan.activation_groups())


def allocate(plan: BitPlan, sensitivity: Sensitivity, budget, w_bits=None, a_bits=None,
             weight_scale: float = 1.0) -> Allocation:
    """The optimal plan (module docstring) for ``budget``; ``plan`` is not changed (the result holds a
    copy). ``weight_scale``: the weights' sensitivities count ``weight_scale`` times in the objective
    (:mod:`labkit.lab.probe`); the result's ``objective`` is the unscaled sum."""
    if not weight_scale > 0:
        raise ValueError(f"weight_scale {weight_scale!r}: give a positive factor")
    spec = parse_budget(budget)
    limits = resolve_budget(plan, spec)
    w_choices = _choices(w_bits, sensitivity.bits, "weight")
    a_choices = _choices(a_bits, sensitivity.bits, "activation")
    groups = plan.activation_groups()
    _check_covered(plan, sensitivity, groups)
    w_allowed, a_allowed = allowed_bits(plan, spec, w_choices, a_choices)
    _check_feasible(plan, limits, w_allowed, a_allowed)
    program = _Program(plan, sensitivity, groups, limits, w_choices, a_choices, (w_allowed, a_allowed),
                       weight_scale)
    result = copy.deepcopy(plan)
    for _ in range(MAX_CUTS):
        chosen = program.solve()
        for layer, b in chosen["w"].items():
            result.set(layer, w_bits=b)
        for group, b in chosen["a"].items():
            result.set_quantizer(group, b)
        totals = result.totals()
        if all(totals[k] <= v for k, v in limits.items()):
            return Allocation(result, spec, limits, predicted_increase(result, sensitivity), totals,
                              sensitivity, w_choices, a_choices, weight_scale)
        program.cut(chosen)  # over a budget by the solver's tolerance only: exclude this assignment
    raise RuntimeError(
        f"no plan within the budget after {MAX_CUTS} solver tolerance cuts: report this budget"
    )


def _choices(bits, measured: tuple[int, ...], what: str) -> tuple[int, ...]:
    out = tuple(sorted(set(measured if bits is None else bits)))
    missing = [b for b in out if b not in measured]
    if not out or missing:
        raise BudgetError(
            f"{what} bits {missing or list(out)}: the sensitivity was measured at "
            f"{', '.join(map(str, measured))} bits only; allow those or measure it at these too"
        )
    return out


def _check_covered(plan: BitPlan, sensitivity: Sensitivity, groups: dict) -> None:
    for names, have, what in ((list(plan.w_bits), sensitivity.weights, "weight layer"),
                              (list(groups), sensitivity.activations, "activation group")):
        missing = [n for n in names if n not in have]
        if missing:
            raise BudgetError(f"the sensitivity has no {what} '{missing[0]}' ({len(missing)} missing): it "
                              "was measured on another network; measure it with this config")


def _check_feasible(plan: BitPlan, limits: dict, w_allowed: dict, a_allowed: dict) -> None:
    """The plan with the fewest allowed bits everywhere is the cheapest in every total (each total grows with
    every layer's and group's bits): it must fit."""
    cheapest = copy.deepcopy(plan)
    for name, choices in w_allowed.items():
        cheapest.set(name, w_bits=choices[0])
    for group, choices in a_allowed.items():
        cheapest.set_quantizer(group, choices[0])
    totals = cheapest.totals()
    w_low, a_low = min(c[0] for c in w_allowed.values()), min((c[0] for c in a_allowed.values()),
                                                              default=None)
    floors = any(c[0] != w_low for c in w_allowed.values()) or any(c[0] != a_low for c in a_allowed.values())
    for metric, limit in limits.items():
        if totals[metric] > limit:
            fewest = (f"the fewest allowed bits everywhere (weights {w_low}, activations {a_low}) with the "
                      f"structural limits (min_bits; lower one by stating it, e.g. min_bits:last={w_low})"
                      if floors else f"every weight at {w_low} and every activation at {a_low} bits")
            raise BudgetError(f"budget {metric} <= {limit:,} cannot be met: even {fewest} costs "
                              f"{totals[metric]:,}; raise the budget or allow fewer bits")


def _bops_row(plan: BitPlan, index: dict, w_choices, a_choices, rows: list, z: list, n_cost: int) -> dict:
    """The BOPs row: products of a layer's weight bits and the bits of the group it reads, linearised with
    one 0/1 column ``z[b, a]`` per pair (appended to ``z``; ``sum_a z[b, a] = x[b]``, ``sum_b z[b, a] = y[a]``
    appended to ``rows``)."""
    row: dict[int, float] = {}
    for g in plan.layers:
        if g.input == INPUT:
            for b in w_choices:
                row[index["w", g.name, b]] = bops(g.macs, b, plan.a_bits[INPUT])
            continue
        group = plan.leader(g.input)
        cols = {}
        for b in w_choices:
            for a in a_choices:
                cols[b, a] = n_cost + len(z)
                z.append(0.0)
                row[cols[b, a]] = bops(g.macs, b, a)
        for b in w_choices:
            rows.append(({index["w", g.name, b]: -1.0, **{cols[b, a]: 1.0 for a in a_choices}}, 0.0, 0.0))
        for a in a_choices:
            rows.append(({index["a", group, a]: -1.0, **{cols[b, a]: 1.0 for b in w_choices}}, 0.0, 0.0))
    return row


class _Program:
    """The 0/1 program of the module docstring, with cuts added by :meth:`cut`."""

    def __init__(self, plan: BitPlan, s: Sensitivity, groups: dict, limits: dict, w_choices, a_choices,
                 allowed: tuple[dict, dict], weight_scale: float = 1.0):
        self.x = [(g.name, b) for g in plan.layers for b in w_choices]
        self.y = [(leader, b) for leader in groups for b in a_choices]
        index = {("w", *v): i for i, v in enumerate(self.x)}
        index.update({("a", *v): len(self.x) + i for i, v in enumerate(self.y)})
        cost = [weight_scale * s.weights[n][b] for n, b in self.x] + [s.activations[n][b] for n, b in self.y]
        geometry = {q.name: q for q in plan.quantizers}
        rows: list[tuple[dict[int, float], float, float]] = []  # ({column: coefficient}, low, high)
        for name in plan.w_bits:
            rows.append(({index["w", name, b]: 1.0 for b in w_choices}, 1.0, 1.0))
        for leader in groups:
            rows.append(({index["a", leader, b]: 1.0 for b in a_choices}, 1.0, 1.0))
        z: list[float] = []
        for metric, limit in limits.items():
            row: dict[int, float] = {}
            fixed = 0
            if metric == "weight_bytes":
                for g in plan.layers:
                    for b in w_choices:
                        row[index["w", g.name, b]] = weight_bytes(g.params, b, g.bias)
            elif metric == "act_bytes":
                fixed = act_bytes(math.prod(geometry[INPUT].shape), plan.a_bits[INPUT])
                for leader, members in groups.items():
                    for b in a_choices:
                        row[index["a", leader, b]] = sum(act_bytes(math.prod(geometry[q].shape),
                                                                   b) for q in members)
            else:
                row = _bops_row(plan, index, w_choices, a_choices, rows, z, len(cost))
            rows.append(({c: v / (limit - fixed) for c, v in row.items()}, -np.inf, 1.0))
        self.n_int = len(cost)
        # the solver's optimality gap is absolute (1e-6): the largest sensitivity becomes OBJECTIVE_SCALE
        scale = OBJECTIVE_SCALE / max(max(abs(c) for c in cost), 1e-300)
        self.c = np.array([c * scale for c in cost] + z)
        self.rows, self.index = rows, index
        self.upper = self._upper(*allowed)

    def _upper(self, w_allowed: dict, a_allowed: dict) -> np.ndarray:
        """Upper bounds of the columns: 0 for a choice below a structural limit, else 1."""
        allowed = [b in w_allowed[n] for n, b in self.x] + [b in a_allowed[n] for n, b in self.y]
        return np.r_[np.array(allowed, dtype=float), np.ones(len(self.c) - len(allowed))]

    def solve(self) -> dict:
        n = len(self.c)
        data = [(r, c, v) for r, (row, _, _) in enumerate(self.rows) for c, v in row.items()]
        r, c, v = zip(*data)
        matrix = coo_array((v, (r, c)), shape=(len(self.rows), n))
        constraint = LinearConstraint(matrix, [lo for _, lo, _ in self.rows], [hi for _, _, hi in self.rows])
        integrality = np.r_[np.ones(self.n_int), np.zeros(n - self.n_int)]
        res = milp(self.c, integrality=integrality, bounds=Bounds(0, self.upper), constraints=constraint,
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            raise BudgetError(f"the bit allocation found no plan ({res.message}): raise the budget or allow "
                              "fewer bits")
        on = res.x > 0.5
        return {"w": {name: b for (name, b), o in zip(self.x, on[:len(self.x)]) if o},
                "a": {name: b for (name, b), o in zip(self.y, on[len(self.x):self.n_int]) if o}}

    def cut(self, chosen: dict) -> None:
        cols = [self.index["w", n, b] for n, b in chosen["w"].items()] + \
            [self.index["a", n, b] for n, b in chosen["a"].items()]
        self.rows.append(({c: 1.0 for c in cols}, -np.inf, len(cols) - 1.0))
