"""The one way to build: a resolved config -> the network (pretrained weights, recipe) and its controllers.

``build_network(cfg)`` makes ``network.class(**network.kwargs)``, loads ``network.pretrained`` (a labkit
checkpoint or a torchvision state dict), then applies ``network.quantize`` with
:func:`labkit.quant.recipe.pact_recipe` (replace, then harmonize) and loads the reference layout's
``finetuning_ckpt``. ``build_controllers(cfg, net)`` turns ``training.quantize`` into the epoch-schedule
controllers of :mod:`labkit.quant.controllers`.
"""

from __future__ import annotations

from torch import nn

from labkit.models import MobileNetV2
from labkit.quant import PACTController, get_pact_controllers
from labkit.quant.recipe import pact_recipe, recipe_options
from labkit.train.pretrained import load_finetuning_checkpoint, load_pretrained

__all__ = ["build_network", "build_float_network", "load_pretrained", "load_finetuning_checkpoint",
           "build_controllers"]


def build_float_network(cfg: dict) -> nn.Module:
    """``network.class(**network.kwargs)`` with fresh weights (no pretrained weights, no quantization)."""
    return MobileNetV2(**cfg["network"]["kwargs"])


def build_network(cfg: dict, pretrained: bool = True) -> tuple[nn.Module, list | None]:
    """``network`` section -> ``(net, quantization report or None)``: model, pretrained weights, recipe,
    ``finetuning_ckpt``.

    ``pretrained=False`` skips ``network.pretrained`` and ``finetuning_ckpt`` (for a caller that loads a run's
    own weights next).
    """
    network = cfg["network"]
    net = build_float_network(cfg)
    if pretrained and network.get("pretrained"):
        load_pretrained(net, network["pretrained"])
    if not network.get("quantize"):
        return net, None
    net, report = pact_recipe(net, network["quantize"])
    finetuning = recipe_options(network["quantize"]).get("finetuning_ckpt")
    if pretrained and finetuning:
        load_finetuning_checkpoint(net, finetuning)
    return net, report


def build_controllers(cfg: dict, net: nn.Module) -> list[PACTController]:
    """``training.quantize`` (reference layout ``{"function", "kwargs"}`` or its kwargs alone) ->
    controllers."""
    quantize = cfg["training"].get("quantize")
    if not quantize:
        return []
    kwargs = quantize.get("kwargs", {}) if "function" in quantize else quantize
    return get_pact_controllers(net, **kwargs)
