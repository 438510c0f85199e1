"""Weights from files into a network: full-precision checkpoints (labkit or torchvision), the reference
recipe's ``finetuning_ckpt``, and torchvision files converted to labkit checkpoints. Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from labkit.config.errors import CheckpointError
from labkit.config.paths import resolve
from labkit.config.schema import ConfigError
from labkit.models import MobileNetV2
from labkit.models.torchvision import (
    from_torchvision,
    is_torchvision_state_dict,
    torchvision_hub_file,
    torchvision_key,
    torchvision_url,
)
from labkit.train.checkpoint import FORMAT, load_file, make_checkpoint, read_state_dict, save_atomic


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load full-precision weights (labkit checkpoint, or a torchvision state dict) into ``net``."""
    state, _ = read_state_dict(path)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"'{path}' holds non-finite values (inf/NaN) in '{bad}': it comes from a "
                              "diverged run; use an earlier checkpoint (network.pretrained) or retrain the "
                              "FP32 network")
    if is_torchvision_state_dict(state):
        state = {torchvision_key(k): v for k, v in state.items()}
    own = net.state_dict()
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"'{path}' does not fit this network: '{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, the "
            f"network's is {tuple(own[wrong[0]].shape)} ({len(wrong)} tensors differ): network.pretrained "
            "needs a full-precision checkpoint of the same width and classes (network.kwargs capacity, "
            "num_classes)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"'{path}' does not fit this network ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): network.pretrained needs a "
            "full-precision checkpoint of the same width and classes (from labkit convert or an FP32 run)")


def load_finetuning_checkpoint(net: nn.Module, path: str) -> None:
    """The reference recipe's ``finetuning_ckpt``: the state dict under ``net`` (or a labkit checkpoint's),
    ``module.`` prefixes stripped, loaded into the quantized ``net`` like the reference does (not strictly:
    a ``UserWarning`` counts the tensors left out on either side). Shape mismatches, or no common tensor at
    all, raise :class:`CheckpointError`."""
    where = "network.quantize.kwargs.finetuning_ckpt"
    file = resolve(path)
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
        raise CheckpointError(f"'{file}' ({where}) does not fit this network: {detail}; it must come from "
                              "the same network (width, classes, network.quantize)")
    net.load_state_dict({k: state[k] for k in common}, strict=False)
    missing, unused = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unused:
        warnings.warn(f"{where} '{file}': loaded {len(common)} of the network's {len(own)} tensors; "
                      f"{len(missing)} are not in it (e.g. {missing[:2]}), {len(unused)} of its tensors are "
                      f"unused (e.g. {unused[:2]})", stacklevel=2)


def load_torchvision_weights(path: str | os.PathLike | None = None) -> dict:
    """torchvision weights from ``path``, or from the torch hub cache when ``path`` is None."""
    if path is None:
        path = torchvision_hub_file()
        if not path.is_file():
            raise CheckpointError(
                f"torchvision's pretrained mobilenet_v2 weights are not in the local cache ('{path}') and "
                f"nothing is downloaded at run time: on a machine with internet, fetch {torchvision_url()} "
                "and copy it to that path, or pass the file with --from FILE")
    obj = load_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not is_torchvision_state_dict(obj):
        raise CheckpointError(f"'{path}' is not a torchvision mobilenet_v2 state dict (no 'features.0.0.*' "
                              "keys)")
    return obj


def save_converted(net: MobileNetV2, output: str | os.PathLike, source: str) -> Path:
    """Write ``net`` as a labkit checkpoint (atomically), recording where its weights came from."""
    network = {"class": "MobileNetV2",
               "kwargs": {"capacity": net.capacity, "num_classes": net.num_classes, "config": net.config}}
    return save_atomic(make_checkpoint(net.state_dict(), network, source=source), output)


def convert_file(output: str | os.PathLike, source: str | os.PathLike | None = None,
                 capacity: float | None = None, config: str = "standard") -> tuple[Path, MobileNetV2]:
    """Write a labkit checkpoint converted from a torchvision state-dict file (or the hub cache)."""
    net = from_torchvision(load_torchvision_weights(source), capacity=capacity, config=config)
    return save_converted(net, output, str(source or torchvision_hub_file())), net
