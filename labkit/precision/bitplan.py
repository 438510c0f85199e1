"""Per-layer bit-width plans: weight bits per quantized conv/linear, activation bits per quantizer.

A plan is read off a config's quantized network (:meth:`BitPlan.from_config`) and written back by editing
``n_levels`` (and ``quantize`` for per-channel weights) in that config's own per-layer entries
(:meth:`BitPlan.apply_to`): every other key stays. Rows, one per quantized conv/linear, pair the layer's
weight bits with the bits of the quantizer that requantizes its output (its activation, or the adder /
signed requantizer that harmonization put after a projection conv); a quantizer that only requantizes
another one (the pool requantizer) follows it. Costs come from :mod:`labkit.precision.costs` (shapes of one
pass).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from labkit.config.errors import ConfigError
from labkit.config.spec import MAX_BITS, MIN_BITS
from labkit.config.tables import Table
from labkit.precision.costs import LayerGeometry, QuantizerGeometry, cost_table
from labkit.quant import PACTConv2d, PACTIntegerAdd, PACTLinear, QuantizerBase
from labkit.quant.harmonize import harmonized_layers
from labkit.quant.harmonize import plan as harmonize_plan
from labkit.quant.recipe import normalize_quantize_config
from labkit.train.build import build_network
from labkit.train.checkpoint import write_text_atomic
from labkit.train.data import input_size

INPUT = "input_quant"
INPUT_BITS = 8
FLOAT = "float"


@dataclass
class LayerBits:
    name: str  # the conv/linear module name, e.g. "features.3.residual_branch.1.0"
    kind: str  # "conv" (stem), "depthwise", "pointwise", "linear"
    act: str | None  # the quantizer of its output (None: the logits)
    w_bits: int
    a_bits: int | None
    per_channel: bool


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if module.kernel_size == (1, 1) else "conv"


class BitPlan:
    """Bits of every quantized layer and quantizer of a harmonized fake-quant network ``qnet`` (as built from
    a config), with bulk edits, costs, and the config edit that realises the plan."""

    def __init__(self, qnet: fx.GraphModule, input_shape: tuple, input_bits: int = INPUT_BITS):
        self.input_shape, self.input_bits = tuple(input_shape), input_bits
        modules = dict(qnet.named_modules())
        # what the (harmonized) network has, nothing to insert
        found = harmonize_plan(qnet, requant_pool=False)
        self.links, self.follows = found.links, found.follows
        self.inserted = {d["name"] for d in harmonized_layers(qnet)}
        layer_mods = {n: m for n, m in modules.items() if isinstance(m, (PACTConv2d, PACTLinear))}
        inside_adders = {f"{n}.{c}" for n, m in modules.items() if isinstance(m, PACTIntegerAdd)
                         for c, _ in m.named_modules() if c}
        quantizers = [n for n, m in modules.items() if n not in inside_adders and
                      (isinstance(m, PACTIntegerAdd) or (isinstance(m,
                                                                    QuantizerBase) and n not in layer_mods))]
        self.w_bits = {n: m.spec.bits for n, m in layer_mods.items()}
        self.per_channel = {n: m.spec.per_channel for n, m in layer_mods.items()}
        self.a_bits = {INPUT: input_bits, **{n: modules[n].spec.bits for n in quantizers}}
        self.kinds = {n: _kind(m) for n, m in layer_mods.items()}
        self._geometry(qnet, layer_mods, quantizers)
        self.original = copy.deepcopy((self.w_bits, self.a_bits, self.per_channel))

    @classmethod
    def from_config(cls, cfg: dict) -> BitPlan:
        """The plan of a PACT/TQT config as it stands (its network built without pretrained weights)."""
        if not cfg["network"].get("quantize"):
            raise ConfigError("network.quantize", "is missing: a bit-width plan needs a PACT or TQT config",
                              "Start from e.g. configs/embedded/config.pact.json")
        qnet, _ = build_network(cfg, pretrained=False)
        if not isinstance(qnet, fx.GraphModule):
            raise ConfigError("network.quantize.harmonize", "is false: a bit-width plan needs the harmonized "
                                                            "network")
        plan = cls(qnet, (1, 3, input_size(cfg["data"]), input_size(cfg["data"])))
        plan.base_config = cfg
        return plan

    def _geometry(self, qnet: fx.GraphModule, layer_mods: dict, quantizers: list[str]) -> None:
        was = qnet.training
        qnet.eval()
        try:
            with torch.no_grad():
                ShapeProp(qnet).propagate(torch.zeros(self.input_shape))
        finally:
            qnet.train(was)
        shapes = {
            n.target: tuple(n.meta["tensor_meta"].shape[1:])
            for n in qnet.graph.nodes
            if n.op == "call_module"
        }
        self.layers = [LayerGeometry(n, "dw conv" if self.kinds[n] == "depthwise" else
                                     ("linear" if self.kinds[n] == "linear" else "conv"),
                                     m.weight.numel(), 0 if m.bias is None else m.bias.numel(),
                                     math.prod(shapes[n]) * m.weight[0].numel(), self._input_of(n))
                       for n, m in layer_mods.items()]
        self.quantizers = [QuantizerGeometry(INPUT, "input quant", self.input_shape[1:])] + [
            QuantizerGeometry(n, "integer add" if n.endswith("integer_add") else "requant",
                              shapes[n]) for n in quantizers]
        order = {INPUT: -1, **{n.target: i for i, n in enumerate(qnet.graph.nodes)}}
        self.order = sorted([g.name for g in self.layers] + [q.name for q in self.quantizers], key=order.get)

    def _input_of(self, layer: str) -> str:
        """The quantizer a layer reads: the input quantizer, an activation, or :data:`FLOAT` (no quantizer:
        a float tensor, e.g. the pool output with ``requant_pool`` false; counted at 32 bits)."""
        name = self.links[layer]["input"]
        if name == "input":
            return INPUT
        if name is None:
            self.a_bits[FLOAT] = 32
            return FLOAT
        return name

    # ------------------------------------------------------------------ rows and edits
    @property
    def rows(self) -> list[LayerBits]:
        return [LayerBits(g.name, self.kinds[g.name], self.links[g.name]["output"], self.w_bits[g.name],
                          self.a_bits.get(self.links[g.name]["output"]),
                          self.per_channel[g.name]) for g in self.layers]

    def __getitem__(self, name: str) -> LayerBits:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no quantized layer named {name!r}; layers: {self.layers[0].name} ... "
                       f"{self.layers[-1].name}")

    def set(self, name: str, w_bits: int | None = None, a_bits: int | None = None,
            per_channel: bool | None = None):
        """Bits of layer ``name``'s weights, of the quantizer of its output (and of quantizers following
        it)."""
        row = self[name]
        if w_bits is not None:
            self.w_bits[name] = check_bits(w_bits, f"{name} weight bits")
        if a_bits is not None and row.act is not None:
            self.set_quantizer(row.act, a_bits)
        if per_channel is not None:
            self.per_channel[name] = bool(per_channel) and row.kind != "linear"

    def set_quantizer(self, name: str, bits: int) -> None:
        if name not in self.a_bits or name in (INPUT, FLOAT):
            raise KeyError(f"no activation quantizer named {name!r}")
        self.a_bits[name] = check_bits(bits, f"{name} activation bits")
        for follower, leader in self.follows.items():
            if leader == name:
                self.set_quantizer(follower, bits)

    def activation_groups(self) -> dict[str, list[str]]:
        """Activation quantizers whose bits are one choice, ``{leader: [leader, *followers]}`` in network
        order: each activation key of :attr:`a_bits` (an integer adder counts once: its inputs and output
        share one ``n_levels``) with the quantizers that follow it (:attr:`follows`); the input quantizer is
        fixed."""
        groups: dict[str, list[str]] = {}
        for name in self.a_bits:
            if name != INPUT:
                members = groups.setdefault(self.leader(name), [self.leader(name)])
                if name not in members:
                    members.append(name)
        return groups

    def leader(self, quantizer: str) -> str:
        """The quantizer whose bits ``quantizer`` follows (itself when it follows none)."""
        while self.follows.get(quantizer) in self.a_bits and self.follows[quantizer] != INPUT:
            quantizer = self.follows[quantizer]
        return quantizer

    def set_all(self, w_bits: int | None = None, a_bits: int | None = None) -> None:
        for row in self.rows:
            self.set(row.name, w_bits, a_bits)

    def set_kind(self, kind: str, w_bits: int | None = None, a_bits: int | None = None) -> None:
        """All layers of one kind (``depthwise``, ``pointwise``, ``conv``, ``linear``)."""
        for row in self.rows:
            if row.kind == kind:
                self.set(row.name, w_bits, a_bits)

    def set_first_last(self, w_bits: int | None = None, a_bits: int | None = None) -> None:
        for row in (self.rows[0], self.rows[-1]):
            self.set(row.name, w_bits, a_bits)

    # ------------------------------------------------------------------ costs
    def cost_table(self) -> Table:
        """Per layer and per quantizer: bits, weight/activation bytes, MACs, BOPs
        (:mod:`labkit.precision.costs`)."""
        return cost_table(self.layers, self.quantizers, self.w_bits, self.a_bits, self.order)

    def totals(self) -> dict:
        return self.cost_table().totals

    def costs(self) -> list[dict]:
        """One dict per layer: bits, its weight bytes, its output's activation bytes and its BOPs."""
        rows = {r["layer"]: r for r in self.cost_table().rows}
        return [{"name": r.name, "kind": r.kind, "w_bits": r.w_bits, "a_bits": r.a_bits,
                 "weight_bytes": rows[r.name]["weight_bytes"],
                 "act_bytes": rows[r.act]["act_bytes"] if r.act else 0, "BOPs": rows[r.name]["BOPs"]}
                for r in self.rows]

    def as_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def describe(self) -> str:
        """``W 4-8 / A 4-8 bits`` style summary of the plan."""
        w, a = sorted(set(self.w_bits.values())), sorted({v for k,
                                                          v in self.a_bits.items() if k not in (INPUT,
                                                                                                FLOAT)})
        span = lambda b: str(b[0]) if len(b) == 1 else f"{b[0]}-{b[-1]}"  # noqa: E731
        return f"W {span(w)} / A {span(a)} bits"

    # ------------------------------------------------------------------ config
    def apply_to(self, cfg: dict, description: str | None = None) -> dict:
        """A copy of the PACT/TQT config ``cfg`` whose per-layer entries carry this plan's ``n_levels`` (and
        ``quantize``); every other key is kept. A regex entry that covers several layers is edited only when
        they all get the same value; else :class:`ConfigError` asks to list those layers one by one."""
        cfg = copy.deepcopy(cfg)
        quantize = cfg["network"]["quantize"]
        section = quantize["kwargs"]["config"] if "function" in quantize else quantize
        final = {n: {"n_levels": 2 ** self.w_bits[n],
                     "quantize": "per_channel" if self.per_channel[n] else "per_layer"}
                 for n in self.kinds}
        final.update({n: {"n_levels": 2 ** b} for n, b in self.a_bits.items() if n not in (INPUT, FLOAT)})
        w0, a0, pc0 = self.original  # only what the plan changes is written
        changed: dict[str, dict] = {}
        for n in self.kinds:
            if self.w_bits[n] != w0[n]:
                changed.setdefault(n, {})["n_levels"] = final[n]["n_levels"]
            if self.per_channel[n] != pc0[n]:
                changed.setdefault(n, {})["quantize"] = final[n]["quantize"]
        changed.update(
            {n: {"n_levels": 2**b} for n, b in self.a_bits.items() if n not in (INPUT, FLOAT) and b != a0[n]}
        )
        groups = {"PACTConv2d": [n for n, k in self.kinds.items() if k != "linear"],
                  "PACTLinear": [n for n, k in self.kinds.items() if k == "linear"],
                  "PACTUnsignedAct": [n for n in self.a_bits if n not in (INPUT,
                                                                          FLOAT) and n not in self.inserted]}
        for class_key, names in groups.items():
            todo = {n: changed[n] for n in names if n in changed}
            if todo:
                _edit_entries(section.setdefault(class_key, {}), todo, {n: final[n] for n in names},
                              f"network.quantize.{class_key}")
        inserted = {n: changed[n] for n in self.inserted if n in changed}
        if inserted:
            harmonize = section.get("harmonize")
            harmonize = {} if harmonize in (None, True) else harmonize
            if harmonize is False:
                raise ConfigError("network.quantize.harmonize", "is false, so the plan's inserted quantizers "
                                                                "do not exist")
            section["harmonize"] = harmonize
            _edit_entries(harmonize.setdefault("layers", {}), inserted, {n: final[n] for n in self.inserted},
                          "network.quantize.harmonize.layers")
        cfg.pop("name", None)
        if description is not None:
            cfg["description"] = description
        normalize_quantize_config(cfg["network"]["quantize"])  # the edited section is valid
        return cfg

    def save(self, cfg: dict, path: str | Path, description: str | None = None) -> Path:
        """Write :meth:`apply_to` of ``cfg`` as JSON (atomically)."""
        return write_text_atomic(json.dumps(self.apply_to(cfg, description), indent=4) + "\n", path)


def _edit_entries(section: dict, changed: dict[str, dict], final: dict[str, dict], where: str) -> None:
    """Give each module of ``changed`` its new settings through the regex entry of ``section`` that matches it
    (an exact ``re.escape(name)$`` entry is added where none does). An entry that also covers other modules is
    edited only when all of them end with the same value (``final``: every module's settings after the
    plan)."""
    claims = {regex: [n for n in final if re.match(regex, n)] for regex in section if regex != "kwargs"}
    for name, settings in changed.items():
        regex = next((r for r, hits in claims.items() if name in hits), None)
        if regex is None:
            section[re.escape(name) + "$"] = dict(settings)
            continue
        entry = section[regex] if isinstance(section[regex], dict) else {}
        for key, value in settings.items():
            clash = next((n for n in claims[regex] if final[n].get(key) != value), None)
            if clash is not None:
                raise ConfigError(f"{where}[{regex!r}]", f"covers '{name}' and '{clash}', which the plan "
                                  f"gives different {key}", "List these layers one by one in the config")
            entry[key] = value
        section[regex] = entry


def check_bits(bits, what: str) -> int:
    """``bits`` as an integer from :data:`MIN_BITS` to :data:`MAX_BITS`, else ``ValueError`` naming
    ``what``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what}: {bits!r} is not a bit-width from {MIN_BITS} to {MAX_BITS}")
    return bits
