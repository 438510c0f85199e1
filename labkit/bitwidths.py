"""Per-layer bit-width plans: one row per quantized conv/linear, turned into a ``network.quantize`` config.

A row holds the layer's weight bits, the bits of the activation quantizer that follows it (its ReLU6, or for
a projection conv the block's ``integer_add`` / ``output_act`` that harmonization inserts) and whether
weights are quantized per channel. Costs per layer come from one shape pass at the input size:

- weight memory = params * w_bits / 8 bytes;  activation memory = output elements * a_bits / 8 bytes
- BOPs = MACs * w_bits * a_in_bits  (a_in_bits: bits of the layer's input; the image counts as 8 bit)
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from labkit.models.mobilenetv2 import InvertedResidual

MIN_BITS, MAX_BITS = 2, 16
INPUT_BITS = 8


@dataclass
class LayerBits:
    name: str  # the conv/linear module name, e.g. "features.3.residual_branch.1.0"
    kind: str  # "conv" (stem), "depthwise", "pointwise", "linear"
    act: str | None  # the activation quantizer after it (None: the logits)
    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = True
    params: int = 0
    macs: int = 0
    out_elements: int = 0


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if module.kernel_size == (1, 1) else "conv"


def _activation_after(name: str, modules: dict) -> str | None:
    """``X.0`` with a ReLU at ``X.2`` -> ``X.2``; a block's projection conv -> its integer_add/output_act."""
    parent, _, index = name.rpartition(".")
    if index == "0" and isinstance(modules.get(f"{parent}.2"), (nn.ReLU, nn.ReLU6)):
        return f"{parent}.2"
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "features":
        block = modules.get(".".join(parts[:2]))
        if isinstance(block, InvertedResidual):
            return f"features.{parts[1]}.{'integer_add' if block.use_skip else 'output_act'}"
    return None


class BitPlan:
    """Bit-widths for every quantized layer of a float MobileNetV2, with bulk edits, costs and validation."""

    def __init__(self, net: nn.Module, input_size: int = 224, w_bits: int = 8, a_bits: int = 8):
        self.net = net
        self.input_size = input_size
        modules = dict(net.named_modules())
        self.rows = [LayerBits(n, _kind(m), _activation_after(n, modules), w_bits, a_bits, not isinstance(m, nn.Linear))
                     for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self._measure()

    def _measure(self) -> None:
        shapes: dict[str, torch.Size] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, o.shape))
                 for n, m in self.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        was_training = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()(torch.zeros(1, 3, self.input_size, self.input_size))
        finally:
            self.net.train(was_training)
            for h in hooks:
                h.remove()
        modules = dict(self.net.named_modules())
        for row in self.rows:
            m, out = modules[row.name], shapes[row.name]
            row.params = m.weight.numel()
            row.out_elements = out.numel()
            per_output = m.weight[0].numel()  # MACs per output element
            row.macs = out.numel() * per_output

    # ------------------------------------------------------------------ edits
    def __getitem__(self, name: str) -> LayerBits:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no quantized layer named {name!r}; layers: {self.rows[0].name} ... {self.rows[-1].name}")

    def set(self, name: str, w_bits: int | None = None, a_bits: int | None = None, per_channel: bool | None = None):
        row = self[name]
        if w_bits is not None:
            row.w_bits = _check_bits(w_bits, f"{name} weight bits")
        if a_bits is not None:
            row.a_bits = _check_bits(a_bits, f"{name} activation bits")
        if per_channel is not None:
            row.per_channel = bool(per_channel) and row.kind != "linear"

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
    def input_bits(self) -> dict[str, int]:
        """Bits of each layer's input: the previous row's activation bits (the image: 8)."""
        bits, previous = {}, INPUT_BITS
        for row in self.rows:
            bits[row.name] = previous
            previous = row.a_bits if row.act else previous
        return bits

    def costs(self) -> list[dict]:
        a_in = self.input_bits()
        return [{"name": r.name, "kind": r.kind, "w_bits": r.w_bits, "a_bits": r.a_bits if r.act else None,
                 "weight_bytes": r.params * r.w_bits / 8, "activation_bytes": r.out_elements * (r.a_bits if r.act else 32) / 8,
                 "bops": r.macs * r.w_bits * a_in[r.name]} for r in self.rows]

    def totals(self) -> dict:
        """Weight and activation memory (bytes), BOPs, and the same at FP32 for reference."""
        costs = self.costs()
        fp32 = {"weight_bytes": sum(r.params for r in self.rows) * 4,
                "bops": sum(r.macs for r in self.rows) * 32 * 32}
        return {"weight_bytes": sum(c["weight_bytes"] for c in costs),
                "activation_bytes": sum(c["activation_bytes"] for c in costs),
                "max_activation_bytes": max(c["activation_bytes"] for c in costs),
                "bops": sum(c["bops"] for c in costs),
                "weight_compression": fp32["weight_bytes"] / sum(c["weight_bytes"] for c in costs),
                "bops_vs_fp32": sum(c["bops"] for c in costs) / fp32["bops"]}

    # ------------------------------------------------------------------ output
    def to_quantize_config(self, tqt: bool = False, pow2: bool = False) -> dict:
        """The ``network.quantize`` section (seed layout) for this plan."""
        from labkit.recipe import default_quantize_config

        overrides: dict = {}
        for row in self.rows:
            overrides[row.name] = {"n_levels": 2 ** row.w_bits, "init_clip": "max" if row.w_bits >= 8 else "sawb_asymm",
                                   "quantize": "per_channel" if row.per_channel else "per_layer"}
            if row.act:
                overrides[row.act] = row.a_bits
        last_act = [r for r in self.rows if r.act][-1]
        overrides["avgpool_act"] = last_act.a_bits  # the classifier's input: the pooled last activation
        return default_quantize_config(self.net, 8, 8, tqt=tqt, pow2=pow2, overrides=overrides)

    def to_config(self, base_config: dict, tqt: bool | None = None, pow2: bool = False) -> dict:
        """``base_config`` (a PACT/TQT config) with this plan as its ``network.quantize``."""
        cfg = copy.deepcopy(base_config)
        if tqt is None:  # keep the base config's algorithm
            tqt, pow2 = _algorithm(cfg["network"].get("quantize"))
        cfg["network"]["quantize"] = self.to_quantize_config(tqt=tqt, pow2=pow2)
        return cfg

    def save(self, base_config: dict, path: str | Path, **kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.to_config(base_config, **kwargs)
        cfg.pop("name", None)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    def as_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]


def _algorithm(quantize_cfg: dict | None) -> tuple[bool, bool]:
    """``(tqt, pow2)`` of a ``network.quantize`` section (from its conv defaults); FP32 configs give PACT."""
    if not quantize_cfg:
        return False, False
    from labkit.recipe import normalize_quantize_config

    defaults = normalize_quantize_config(quantize_cfg).get("PACTConv2d", {}).get("kwargs", {})
    return bool(defaults.get("tqt", False)), bool(defaults.get("pow2", False))


def _check_bits(bits, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what}: {bits!r} is not a bit-width from {MIN_BITS} to {MAX_BITS}")
    return bits
