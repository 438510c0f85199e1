"""The one way to build: a resolved config -> the network (pretrained weights, recipe) and its controllers.

``build_network(cfg)`` makes ``network.class(**network.kwargs)``, loads ``network.pretrained`` (a labkit
checkpoint or a torchvision state dict), then applies ``network.quantize`` with
:func:`labkit.recipe.pact_recipe` (replace, then harmonize) and loads the reference layout's
``finetuning_ckpt``. ``build_controllers(cfg, net)`` turns ``training.quantize`` into the epoch-schedule
controllers of :mod:`labkit.quant.controllers`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from labkit.checkpoint import FORMAT, CheckpointError, load_file, read_state_dict
from labkit.convert import is_torchvision_state_dict, torchvision_key
from labkit.models import MobileNetV2
from labkit.paths import resolve
from labkit.quant import PACTController, get_pact_controllers
from labkit.recipe import pact_recipe, recipe_options
from labkit.schema import ConfigError

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


def load_finetuning_checkpoint(net: nn.Module, path: str) -> None:
    """The reference recipe's ``finetuning_ckpt``: the state dict under ``net`` (or a labkit checkpoint's),
    ``module.`` prefixes stripped, loaded into the quantized ``net`` like the reference does (not strictly:
    a ``UserWarning`` counts the tensors left out on either side). Shape mismatches, or no common tensor at
    all, raise :class:`CheckpointError`."""
    where = "network.quantize.kwargs.finetuning_ckpt"
    file = resolve(path, must_exist=True)
    if not file.is_file():
        raise ConfigError(where, f"file '{path}' not found", "Fix the path or remove the key")
    obj = load_file(file)
    state = obj.get("net") if isinstance(obj, dict) else None
    if state is None and isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj["state_dict"]
    if not isinstance(state, dict):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"'{file}' ({where}) holds no state dict under 'net' (it holds: {keys}): the "
                              "reference's checkpoints keep the network's weights there")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = net.state_dict()
    common = [k for k in state if k in own]
    wrong = [k for k in common if getattr(state[k], "shape", None) != own[k].shape]
    if wrong or not common:
        detail = (f"'{wrong[0]}' has shape {tuple(getattr(state[wrong[0]], 'shape', ()))}, the network's "
                  f"{tuple(own[wrong[0]].shape)}" if wrong else "no tensor name matches the network's")
        raise CheckpointError(f"'{file}' ({where}) does not fit this network: {detail}; it must come from the "
                              "same network (width, classes, network.quantize)")
    net.load_state_dict({k: state[k] for k in common}, strict=False)
    missing, unused = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unused:
        warnings.warn(f"{where} '{file}': loaded {len(common)} of the network's {len(own)} tensors; "
                      f"{len(missing)} are not in it (e.g. {missing[:2]}), {len(unused)} of its tensors are "
                      f"unused (e.g. {unused[:2]})", stacklevel=2)


def build_controllers(cfg: dict, net: nn.Module) -> list[PACTController]:
    """``training.quantize`` (reference layout ``{"function", "kwargs"}`` or its kwargs alone) -> controllers."""
    quantize = cfg["training"].get("quantize")
    if not quantize:
        return []
    kwargs = quantize.get("kwargs", {}) if "function" in quantize else quantize
    return get_pact_controllers(net, **kwargs)
