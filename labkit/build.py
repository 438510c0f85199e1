"""The one way to build: a resolved config -> the network (pretrained weights, recipe) and its controllers.

``build_network(cfg)`` makes ``network.class(**network.kwargs)``, loads ``network.pretrained`` (a labkit
checkpoint or a torchvision state dict), then applies ``network.quantize`` with
:func:`labkit.recipe.pact_recipe` (replace, then harmonize). ``build_controllers(cfg, net)`` turns
``training.quantize`` into the epoch-schedule controllers of :mod:`labkit.quant.controllers`.
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.checkpoint import CheckpointError, read_state_dict
from labkit.convert import is_torchvision_state_dict, torchvision_key
from labkit.models import MobileNetV2
from labkit.quant import PACTController, get_pact_controllers
from labkit.recipe import pact_recipe

__all__ = ["build_network", "build_float_network", "load_pretrained", "build_controllers"]


def build_float_network(cfg: dict) -> nn.Module:
    """``network.class(**network.kwargs)`` with fresh weights (no pretrained weights, no quantization)."""
    return MobileNetV2(**cfg["network"]["kwargs"])


def build_network(cfg: dict, pretrained: bool = True) -> tuple[nn.Module, list | None]:
    """``network`` section -> ``(net, quantization report or None)``: model, pretrained weights, recipe.

    ``pretrained=False`` skips ``network.pretrained`` (for a caller that loads a run's own weights next).
    """
    network = cfg["network"]
    net = build_float_network(cfg)
    if pretrained and network.get("pretrained"):
        load_pretrained(net, network["pretrained"])
    if not network.get("quantize"):
        return net, None
    return pact_recipe(net, network["quantize"])


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load full-precision weights (labkit checkpoint, or a torchvision state dict) into ``net``."""
    state, _ = read_state_dict(path)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"'{path}' holds non-finite values (inf/NaN) in '{bad}': it comes from a diverged run; "
                              "use an earlier checkpoint (network.pretrained) or retrain the FP32 network")
    if is_torchvision_state_dict(state):
        state = {torchvision_key(k): v for k, v in state.items()}
    own = net.state_dict()
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"'{path}' does not fit this network: '{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, the "
            f"network's is {tuple(own[wrong[0]].shape)} ({len(wrong)} tensors differ): network.pretrained needs a "
            "full-precision checkpoint of the same width and classes (network.kwargs capacity, num_classes)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"'{path}' does not fit this network ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): network.pretrained needs a full-precision "
            "checkpoint of the same width and classes (from labkit convert or an FP32 run)")


def build_controllers(cfg: dict, net: nn.Module) -> list[PACTController]:
    """``training.quantize`` (reference layout ``{"function", "kwargs"}`` or its kwargs alone) -> controllers."""
    quantize = cfg["training"].get("quantize")
    if not quantize:
        return []
    kwargs = quantize.get("kwargs", {}) if "function" in quantize else quantize
    return get_pact_controllers(net, **kwargs)
