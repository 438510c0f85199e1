"""The int32 twin: every requantization of an integer network in int32 (:mod:`labkit.integer.int32_layer` says
how one is computed and chosen), from input intervals that are **proven** by default and the per-layer plan.

The interval of each requantization's input is propagated through the integer graph from the input grid
(conv/linear per output channel ``sum_k min(w_k lo, w_k hi) .. sum_k max(w_k lo, w_k hi)`` + bias over the
input codes ``lo..hi``; a sum pool multiplies by the window; an adder's output requantization sees the sum
of its inputs' code ranges), so no input on the grid can overflow. With ``calibration`` data the interval is
``|x| <= margin * max |x|`` seen per channel (capped by the proven one): larger shifts, not proven; the twin
then checks every partial sum as it runs and raises on an overflow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from labkit.config.tables import Table
from labkit.integer.compare import Comparison
from labkit.integer.int32_layer import (
    INT32_MAX,
    MAX_GROUPS,
    PRECLIP,
    TOLERANCE,
    Int32Requant,
    Points,
    PreClip,
    int32_requant,
)
from labkit.integer.modules import (
    IntAdd,
    IntConv2d,
    IntegerizeError,
    IntLinear,
    IntSumPool,
    QuantizeInput,
    Requant,
    requant_layers,
)

__all__ = ["INT32_MAX", "Int32Requant", "Int32Plan", "PreClip", "int32_requant", "int32_twin",
           "input_intervals",
           "calibrated_intervals"]


@dataclass
class Int32Plan:
    """Per requantization (graph order): its input interval (``acc_lo..acc_hi``), the int64 twin's shift
    ``d``, the int32 shifts ``d32..d32_max`` in ``groups`` shift groups, the pre-clip sides, the Deeploy
    ``nodes``, the smallest multiplier in bits, the proven ``error`` (codes: how far the int32 value before
    the floor can be from the exact one inside the window where the output is not clipped), ``flat_pct`` (the
    share of the constant images' centre codes that are the exact ones), the int32 ``bound`` (largest partial
    sum), the headroom ``2^31 - 1 - bound`` (also in bits) and, after :meth:`add_agreement`,
    ``identical_pct``."""

    layers: list[dict]
    margin: float | None  # None: proven bounds
    agreement: str = ""  # what identical_pct was measured on

    COLUMNS = ("layer", "bounds", "acc_lo", "acc_hi", "d", "d32", "d32_max", "groups", "preclip", "nodes",
               "mul_bits",
               "error", "flat_pct", "bound", "headroom", "headroom_bits")

    @property
    def worst(self) -> dict:
        return min(self.layers, key=lambda r: r["headroom"])

    def add_agreement(self, result: Comparison, what: str) -> None:
        """``identical_pct`` per layer: the int32 twin's codes identical to the exact twin's, layer by layer
        (each int32 layer fed the exact twin's input), from ``compare(inet, inet32, images)``; ``what``: the
        images."""
        by_layer = {r["layer"]: r["identical"] for r in result.code_layers}
        missing = [r["layer"] for r in self.layers if r["layer"] not in by_layer]
        if missing or result.reference != "integer reference":
            raise IntegerizeError("int32 plan: the comparison must be compare(inet, inet32, ...) of this "
                                  "plan's networks (no row for "
                                  f"'{missing[0] if missing else result.reference}')")
        for r in self.layers:
            r["identical_pct"] = by_layer[r["layer"]]
        self.agreement = f"{what}: worst layer '{result.worst['layer']}' {result.worst['identical']:.4f}% " \
                         f"identical codes, predictions {result.predictions:.2f}% identical"

    def summary(self) -> str:
        how = "proven on the input grid" if self.margin is None else f"calibrated, margin x{self.margin:g}"
        d32 = [r["d32"] for r in self.layers]
        extra = [f"{sum(r['groups'] > 1 for r in self.layers)} with shift groups"] * any(
            r["groups"] > 1 for r in self.layers
        )
        extra += [f"{sum(bool(r['preclip']) for r in self.layers)} pre-clipped"] * any(r["preclip"] for r in
                                                                                        self.layers)
        worst = max(self.layers, key=lambda r: r["error"])
        return (
            f"{len(self.layers)} int32 requantizations ({how}{''.join(', ' + e for e in extra)}): d32 "
            f"{min(d32)}..{max(d32)}, {sum(r['nodes'] for r in self.layers)} Deeploy nodes, largest "
            f"proven error {worst['error']:.2g} codes in '{worst['layer']}', least headroom "
            f"{self.worst['headroom_bits']:.3f} bits in '{self.worst['layer']}'"
            + (f"; int32 vs exact twin on {self.agreement}" if self.agreement else "")
        )

    def table(self) -> Table:
        return Table(self.layers, self.COLUMNS + ("identical_pct",) * bool(self.agreement),
                     title=self.summary())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return str(self.table())


# ------------------------------------------------------------------------------------------ intervals
@torch.no_grad()
def _input_shapes(inet: fx.GraphModule) -> dict[str, tuple]:
    """Input shape of every sum pool (one forward pass on zeros)."""
    shapes, hooks = {}, []
    for name, m in inet.named_modules():
        if isinstance(m, IntSumPool):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
    try:
        inet(torch.zeros((1, *inet.input_quant.out_shape)))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _linear_interval(m: IntConv2d | IntLinear, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.weight.flatten(1)
    a, b = w * lo, w * hi
    out_lo, out_hi = torch.minimum(a, b).sum(1), torch.maximum(a, b).sum(1)
    if m.bias is not None:
        out_lo, out_hi = out_lo + m.bias, out_hi + m.bias
    return out_lo, out_hi


def input_intervals(inet: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Requantization name -> ``(lo, hi)`` (int64, per channel or scalar): every value its input can take for
    any input on the network's input grid (module docstring)."""
    mods = dict(inet.named_modules())
    pool_shapes = _input_shapes(inet)
    env: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    out = {}

    def codes(r) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(r.lo), torch.tensor(r.hi)

    for node in inet.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_module" or isinstance(mods[node.target], nn.Flatten):
            env[node] = env[node.args[0]]  # flatten / reshape: the values pass unchanged
            continue
        m = mods[node.target]
        x = env.get(node.args[0])
        if isinstance(m, QuantizeInput):
            env[node] = codes(m)
        elif isinstance(m, (IntConv2d, IntLinear)):
            env[node] = _linear_interval(m, int(x[0].min()), int(x[1].max()))
        elif isinstance(m, Requant):
            out[node.target], env[node] = x, codes(m)
        elif isinstance(m, IntSumPool):
            n, c, h, w = pool_shapes[node.target]
            k = m.kernel_size or (h, w)
            env[node] = (x[0] * k[0] * k[1], x[1] * k[0] * k[1])
        elif isinstance(m, IntAdd):
            for i, arg in enumerate(node.args):
                out[f"{node.target}.acts.{i}"] = env[arg]
            out[f"{node.target}.act_out"] = (torch.tensor(sum(r.lo for r in m.acts)),
                                             torch.tensor(sum(r.hi for r in m.acts)))
            env[node] = codes(m.act_out)
        else:
            raise IntegerizeError(f"int32: no interval rule for module '{node.target}' ({type(m).__name__})")
    return out


@torch.no_grad()
def calibrated_intervals(inet: fx.GraphModule, batches, margin: float) -> dict[str,
                                                                               tuple[torch.Tensor,
                                                                                     torch.Tensor]]:
    """Requantization name -> ``(-M, M)`` per channel, ``M = margin * max |x|`` over the calibration inputs
    (``batches``: image tensors or ``(images, labels)`` pairs), capped by :func:`input_intervals`."""
    if not margin >= 1.0:
        raise IntegerizeError("int32: the calibration margin must be >= 1 (a factor on the largest value "
                              f"seen), got {margin}")
    peak: dict[str, torch.Tensor] = {}
    hooks = []
    for name, r in requant_layers(inet):
        def hook(_m, args, name=name):
            a = args[0].abs().transpose(0, 1).flatten(1).amax(1)
            peak[name] = a if name not in peak else torch.maximum(peak[name], a)
        hooks.append(r.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            inet(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
    if not peak:
        raise IntegerizeError("int32: the calibration data is empty")
    proven = input_intervals(inet)
    out = {}
    for name, (lo, hi) in proven.items():
        m = torch.ceil(peak[name].double() * margin).to(torch.int64)
        out[name] = (torch.maximum(lo, -m), torch.minimum(hi, m))
    return out


@torch.no_grad()
def constant_image_points(inet: fx.GraphModule) -> dict[str, Points]:
    """Requantization name -> ``(channel, input value, exact output code)`` of the exact twin on every
    constant input image (every input code), at the centre of the image: the values of flat image regions (a
    digit's background), where one rounding difference repeats over many codes."""
    q = inet.input_quant
    codes = torch.arange(q.lo, q.hi + 1, dtype=torch.float64).view(-1, *[1] * len(q.out_shape))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def centre(t: torch.Tensor) -> torch.Tensor:  # samples x channels
        return t[(slice(None), slice(None), *[n // 2 for n in t.shape[2:]])]

    hooks = [r.register_forward_hook(lambda _m, a, y, name=name: seen.__setitem__(name,
                                                                                  (centre(a[0]), centre(y))))
             for name, r in requant_layers(inet)]
    try:
        inet((codes * q.eps).expand(-1, *q.out_shape))  # the input quantizer gives back the codes
    finally:
        for h in hooks:
            h.remove()
    points = {}
    for name, (x, y) in seen.items():
        channel = torch.arange(x.shape[1]).expand_as(x)
        points[name] = (channel.reshape(-1), x.reshape(-1), y.reshape(-1))
    return points


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[child] = new


def int32_twin(inet: fx.GraphModule, calibration=None, margin: float = 2.0, max_groups: int = MAX_GROUPS,
               preclip: bool = PRECLIP, tolerance: float = TOLERANCE,
               flat: bool = True) -> tuple[fx.GraphModule, Int32Plan]:
    """A copy of ``inet`` whose requantizations run in int32 (:func:`labkit.integer.int32_layer.int32_requant`
    per requantization), and its per-layer plan.

    ``calibration``: None for bounds proven on the whole input grid; or images / ``(images, labels)`` batches
    (e.g. a DataLoader) for the calibrated interval ``margin * max |x|``, not proven. ``max_groups``: the most
    shift groups per requantization (1: one shift each); ``preclip``: allow the pre-clip; ``tolerance``: the
    proven error (codes) within which the form with the fewest Deeploy nodes is taken; ``flat``: move each
    channel's constants within their rounding so that the constant images (every input code) give the exact
    codes at their centre wherever possible (:func:`constant_image_points`).
    """
    proven = calibration is None
    intervals = input_intervals(inet) if proven else calibrated_intervals(inet, calibration, margin)
    points = constant_image_points(inet) if flat else {}
    twin = copy.deepcopy(inet)
    rows = []
    for name, r in requant_layers(twin):
        lo, hi = intervals[name]
        new, row = int32_requant(r, lo, hi, name=name, proven=proven, max_groups=max_groups, preclip=preclip,
                                 tolerance=tolerance, points=points.get(name))
        _set_module(twin, name, new)
        rows.append(row)
    twin.eps_in, twin.output_scale = inet.eps_in, inet.output_scale
    return twin, Int32Plan(rows, None if proven else float(margin))
