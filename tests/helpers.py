"""Shared constants and config helpers of the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import copy
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from labkit.precision.bitplan import BitPlan
from labkit.precision.sensitivity import Sensitivity
from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct
from labkit.quant.harmonize import plan as harmonize_plan
from labkit.quant.recipe import CLASS_TARGETS, pact_recipe

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_FP32 = ROOT / "configs" / "embedded" / "config.fp32.json"
#: the embedded QAT configs the integer tests train (configs/embedded/config.<value>.json)
EMBEDDED_QAT = {"pact8": "pact", "tqt8": "tqt", "pact4": "pact.4b", "tqt4": "tqt.4b"}
#: train() keywords of a test run that checks no console output or TensorBoard events
QUIET = {"progress": False, "log": None, "tensorboard": False}
#: intra-op threads of the session's trained runs: fixed, so that a selected test sees the networks a whole
#: session sees (the thread count changes float32 sums, hence the trained weights); two train the embedded
#: default ~1.9x faster than one on a 2-core machine
TRAIN_THREADS = 2


@contextmanager
def intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_overrides(**extra) -> dict:
    """A quick embedded run: 128 train / 60 valid images, 2 epochs, no dropout or augmentation."""
    overrides = {
        "data.train.dataset.limit": 128,
        "data.valid.dataset.limit": 60,
        "data.train.dataloader.bs": 32,
        "data.train.dataset.transform.kwargs.augment": False,
        "network.kwargs.dropout": 0.0,
        "training.n_epochs": 2,
        "training.gd.lr_sched": {"class": "HandScheduler", "kwargs": {"schedule": {"0": 1, "1": 0.5}}},
        "training.gd.opt.kwargs.lr": 0.02,
    }
    overrides.update(extra)
    return overrides


class SmallNet(nn.Module):
    """stem conv -> ReLU6 -> conv + skip (an integer adder) -> conv -> ReLU6 -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3, padding=1,
                                                    bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU6()
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        return self.fc(self.flatten(self.pool(self.act3(self.bn3(self.conv3(x))))))


SMALL_QUANTIZE = {"PACTConv2d": {"kwargs": {"n_levels": 256}, "conv1$": {}, "conv2$": {}, "conv3$": {}},
                  "PACTLinear": {"fc$": {"n_levels": 256}},
                  "PACTUnsignedAct": {"act1$": {}, "act3$": {}}, "harmonize": {}}
SMALL_INPUT = (1, 3, 6, 6)


def small_quantized_net(tqt: bool) -> nn.Module:
    """SmallNet through the recipe with SMALL_QUANTIZE, every quantizer PACT or TQT, per-channel conv weights
    (the network of tests/data/legacy_quantizers.pt)."""
    cfg = copy.deepcopy(SMALL_QUANTIZE)
    for key in ("PACTConv2d", "PACTLinear", "PACTUnsignedAct"):
        cfg[key]["kwargs"] = {**cfg[key].get("kwargs", {}), "tqt": tqt}
    cfg["PACTConv2d"]["kwargs"]["quantize"] = "per_channel"
    cfg["harmonize"] = {"tqt": tqt}
    return pact_recipe(SmallNet(), cfg)[0]


def small_qnet(net: nn.Module | None = None):
    """:class:`SmallNet` (or ``net``) fake-quantized and harmonized: 4 layers, 3 activation groups."""
    qnet, _ = pact_recipe(net or SmallNet(), SMALL_QUANTIZE)
    return qnet


def small_plan(qnet=None):
    return BitPlan(qnet or small_qnet(), SMALL_INPUT)


def random_sensitivity(plan: BitPlan, bits, seed: int) -> Sensitivity:
    """Decreasing in bits, like measured ones, with a random scale per layer (some slightly negative)."""
    rng = random.Random(seed)

    def curve():
        scale = rng.uniform(0.01, 2.0)
        return {b: scale * rng.uniform(0.5, 1.5) * 2.0 ** -b - rng.uniform(0, 0.002) for b in bits}

    return Sensitivity(tuple(bits), 8, 0.1, {n: curve() for n in plan.w_bits},
                       {g: curve() for g in plan.activation_groups()}, "synthetic", "synthetic")


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


# ----------------------------------------------------------------------------------------- quantize configs
_PACT_TYPES = (PACTConv2d, PACTLinear, PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)
_FLOAT_TARGETS = tuple(t for _, targets in CLASS_TARGETS.values() for t in targets)


def default_quantize_config(net: nn.Module, w_bits: int = 8, a_bits: int = 8, *, tqt: bool = False,
                            pow2: bool = False, overrides: dict[str, int | dict] | None = None,
                            per_channel: bool = True, learn_clip: bool = True, requant_pool: bool = True,
                            weight_init: str | None = None) -> dict:
    """A full per-layer config (seed layout) listing every conv, linear and ReLU/ReLU6 of ``net``.

    Reference values (quantization facts §2): convs ``per_channel`` (``per_channel=False`` -> ``per_layer``),
    linear ``per_layer``, ``symm_wts``; weight init ``max`` at >= 8 bits, else ``sawb_asymm`` (the SAWB
    clip for almost-symmetric grids) unless ``weight_init`` says otherwise; weight bounds follow the weights
    (``learn_clip`` false) for PACT, are learned for TQT; activations ``init_clip const`` (the controllers'
    ``init_clip_hi``), ``rounding``, ``learn_clip`` (PACT learns alpha); inserted quantizers ``init_clip
    max``. ``tqt`` turns on TQT (learned log2 thresholds; ``pow2`` for the paper's power-of-two scales)
    everywhere.

    ``overrides`` maps exact module names to bits (``{"pilot.0": 8}``) or to kwargs dicts; names of modules
    the harmonizer will insert (``avgpool_act``, ``features.2.integer_add``, ``features.0.output_act``) go to
    ``harmonize.layers``. For a conv/linear the bits are the weights', for an activation the output's.
    """
    for what, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"default_quantize_config: {what} must be an integer >= 1, got {bits!r}")
    weight_init = weight_init or ("max" if w_bits >= 8 else "sawb_asymm")
    common = {"tqt": True, "pow2": pow2} if tqt else {"tqt": False}
    config: dict = {
        "PACTConv2d": {"kwargs": {"n_levels": 2 ** w_bits,
                                  "quantize": "per_channel" if per_channel else "per_layer",
                                  "init_clip": weight_init, "learn_clip": bool(tqt), "symm_wts": True,
                                  **common}},
        "PACTLinear": {"kwargs": {"n_levels": 2 ** w_bits, "quantize": "per_layer", "init_clip": weight_init,
                                  "learn_clip": bool(tqt), "symm_wts": True, **common}},
        "PACTUnsignedAct": {"kwargs": {"n_levels": 2 ** a_bits, "init_clip": "const",
                                       "learn_clip": learn_clip or tqt,
                                       "rounding": True, **common}},
        "harmonize": {"n_levels": 2 ** a_bits, "init_clip": "max", "learn_clip": learn_clip or tqt,
                      "symm": True,
                      "rounding": True, **common, "requant_pool": requant_pool, "force_out_eps": False},
    }
    overrides = dict(overrides or {})
    names = dict(net.named_modules())
    for name, module in names.items():
        for class_key, (_, targets) in CLASS_TARGETS.items():
            if name and isinstance(module, targets) and not isinstance(module, _PACT_TYPES):
                bits = w_bits if class_key != "PACTUnsignedAct" else a_bits
                entry = {"n_levels": 2 ** bits}
                entry.update(_override_entry(overrides.pop(name, None), name))
                config[class_key][_layer_key(name, names)] = entry
    layers = {}
    if overrides:
        quantized = [n for n, m in names.items() if n and isinstance(m, _FLOAT_TARGETS)]
        inserted = harmonize_plan(net, quantized, requant_pool=requant_pool).names
        for name, value in overrides.items():
            if name in names:
                raise ValueError(f"default_quantize_config: override '{name}' names a "
                                 f"{type(names[name]).__name__}, which is not quantized (only convs, linears "
                                 "and ReLU/ReLU6 are)")
            if name not in inserted:
                raise ValueError(f"default_quantize_config: override '{name}' names no module of "
                                 f"{type(net).__name__} and no module the harmonizer inserts "
                                 f"({', '.join(inserted)})")
            layers[re.escape(name) + "$"] = _override_entry(value, name)
    if layers:
        config["harmonize"]["layers"] = layers
    return config




def _override_entry(value: int | dict | None, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"default_quantize_config: override for '{name}' must be bits (an integer >= 1) or "
                         f"a kwargs dict, got {value!r}")
    return {"n_levels": 2 ** value}


def _layer_key(name: str, names: dict) -> str:
    """The reference's readable key (``features.3.residual_branch.1.0$``) if it picks only ``name``."""
    key = name + "$"
    if sum(1 for n in names if n and re.match(key, n)) == 1:
        return key
    return re.escape(name) + "$"
