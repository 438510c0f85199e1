"""Load and validate the QuantLab-shaped JSON experiment configuration.

Sections: ``data``, ``network`` {class, kwargs, pretrained, quantize}, ``training`` {loss_fn, gd {opt,
lr_sched}, n_epochs, quantize, seed}; other top-level keys (``meters``, ``description``, ...) are kept
untouched. Every error names the offending key path, e.g. ``training.gd.opt.class``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from labkit.models import STRIDE_TABLES
from labkit.paths import resolve

OPTIMIZERS = ("SGD", "Adam", "AdamW", "PACTSGD", "PACTAdam")
SCHEDULERS = ("HandScheduler", "StepLR", "MultiStepLR", "CosineAnnealingLR", "OneCycleLR")
LOSSES = ("CrossEntropyLoss",)
NETWORKS = ("MobileNetV2",)
DATASETS = ("embedded", "imagenet")


class ConfigError(ValueError):
    """A configuration problem; ``key_path`` names where it is (``training.gd.opt.class``)."""

    def __init__(self, key_path: str, problem: str, fix: str = ""):
        self.key_path = key_path
        message = f"config key '{key_path}': {problem}" if key_path else problem
        super().__init__(f"{message}. {fix}".rstrip(". ") + ("." if fix else ""))


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None, check_files: bool = True) -> dict:
    """Read ``path``, apply dotted-key ``overrides`` (``{"data.root": "/imagenet"}``), validate, return.

    ``check_files=False`` leaves out the check that ``network.pretrained`` exists (for a caller that makes it).
    """
    path = resolve(path, must_exist=True)
    if not path.is_file():
        raise ConfigError("", f"config file '{path}' not found",
                          "Pass the path of a JSON config, e.g. configs/embedded/config.fp32.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("", f"config file '{path}' is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(cfg, dict):
        raise ConfigError("", f"config file '{path}' must hold a JSON object at the top level")
    return resolve_config(cfg, overrides, name=config_name(path), check_files=check_files)


def config_name(path: str | os.PathLike) -> str:
    """``configs/embedded/config.pact.4b.json`` -> ``embedded-pact.4b`` (default run folder name)."""
    path = Path(path)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    stem = stem[len("config."):] if stem.startswith("config.") else stem
    return f"{path.parent.name}-{stem}" if path.parent.name else stem


def resolve_config(cfg: dict, overrides: dict[str, Any] | None = None, name: str = "run",
                   check_files: bool = True) -> dict:
    """Validate a config dict (after ``overrides``); returns a normalised deep copy."""
    cfg = copy.deepcopy(cfg)
    for key_path, value in (overrides or {}).items():
        set_key(cfg, key_path, value)
    cfg.setdefault("name", name)
    _normalise(cfg)
    _validate(cfg, check_files)
    return cfg


def set_key(cfg: dict, key_path: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``key_path = "a.b.c"``, creating missing dicts."""
    *parents, leaf = key_path.split(".")
    node = cfg
    for i, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: i + 1]), "cannot set a sub-key: it is not an object")
    node[leaf] = value


def get_key(cfg: dict, key_path: str, default: Any = None) -> Any:
    """``cfg[a][b][c]`` for ``"a.b.c"``, or ``default`` when any level is missing."""
    node: Any = cfg
    for key in key_path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.n_epochs=3"`` -> ``("training.n_epochs", 3)``; the value is JSON, else a string."""
    if "=" not in text:
        raise ConfigError("", f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _normalise(cfg: dict) -> None:
    network = cfg.get("network")
    if isinstance(network, dict):
        kwargs = network.get("kwargs")
        # the reference framework keeps the checkpoint path under network.kwargs.pretrained
        if isinstance(kwargs, dict) and "pretrained" in kwargs:
            pretrained = kwargs.pop("pretrained")
            network.setdefault("pretrained", pretrained)
    data = cfg.get("data")
    if isinstance(data, dict):
        data.setdefault("name", "imagenet")
        if isinstance(data.get("root"), str):
            data["root"] = str(resolve(data["root"], must_exist=True))
    if isinstance(network, dict) and isinstance(network.get("pretrained"), str):
        network["pretrained"] = str(resolve(network["pretrained"], must_exist=True))


def _expect(cfg: dict, key_path: str, types: type | tuple, required: bool = True, choices=None) -> Any:
    value = get_key(cfg, key_path, _MISSING)
    if value is _MISSING:
        if required:
            raise ConfigError(key_path, "is missing")
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(key_path, f"expected {_type_names(types)}, got a boolean ({value})")
    if not isinstance(value, types):
        raise ConfigError(key_path, f"expected {_type_names(types)}, got {type(value).__name__} ({value!r})")
    if choices is not None and value not in choices:
        raise ConfigError(key_path, f"unknown value {value!r}", f"Choose one of: {', '.join(map(str, choices))}")
    return value


_MISSING = object()


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
             bool: "true/false", type(None): "null"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _validate(cfg: dict, check_files: bool = True) -> None:
    for section in ("data", "network", "training"):
        _expect(cfg, section, dict)

    name = _expect(cfg, "data.name", str, choices=DATASETS)
    if name == "imagenet":
        _expect(cfg, "data.root", str)
    for split in ("train", "valid"):
        _expect(cfg, f"data.{split}", dict, required=False)
        bs = _expect(cfg, f"data.{split}.dataloader.bs", int, required=False)
        if bs is not None and bs < 1:
            raise ConfigError(f"data.{split}.dataloader.bs", f"batch size must be >= 1, got {bs}")
        _expect(cfg, f"data.{split}.dataloader.num_workers", int, required=False)
        _expect(cfg, f"data.{split}.dataset.transform.kwargs.augment", bool, required=False)
        limit = _expect(cfg, f"data.{split}.dataset.limit", (int, type(None)), required=False)
        if limit is not None and limit < 1:
            raise ConfigError(f"data.{split}.dataset.limit", f"must be >= 1 (or null for all), got {limit}")
    _expect(cfg, "data.image_size", int, required=False)

    _expect(cfg, "network.class", str, choices=NETWORKS)
    _expect(cfg, "network.kwargs", dict)
    capacity = _expect(cfg, "network.kwargs.capacity", (int, float), required=False)
    if capacity is not None and capacity <= 0:
        raise ConfigError("network.kwargs.capacity", f"width multiplier must be > 0, got {capacity}")
    classes = _expect(cfg, "network.kwargs.num_classes", int, required=False)
    if classes is not None and classes < 2:
        raise ConfigError("network.kwargs.num_classes", f"needs at least 2 classes, got {classes}")
    _expect(cfg, "network.kwargs.config", str, required=False, choices=tuple(STRIDE_TABLES))
    unknown = set(cfg["network"]["kwargs"]) - {"capacity", "num_classes", "config", "dropout", "seed"}
    if unknown:
        raise ConfigError(f"network.kwargs.{sorted(unknown)[0]}", "unknown MobileNetV2 argument",
                          "Known: capacity, num_classes, config, dropout, seed")
    pretrained = _expect(cfg, "network.pretrained", (str, type(None)), required=False)
    if pretrained and check_files and not Path(pretrained).is_file():
        raise ConfigError("network.pretrained", f"checkpoint file '{pretrained}' not found",
                          "Train the FP32 network first (labkit train configs/<data>/config.fp32.json), "
                          "convert torchvision weights with `labkit convert`, or override it "
                          "(--pretrained PATH, or null to start from scratch)")
    _expect(cfg, "network.quantize", (dict, type(None)), required=False)

    n_epochs = _expect(cfg, "training.n_epochs", int)
    if n_epochs < 1:
        raise ConfigError("training.n_epochs", f"must be >= 1, got {n_epochs}")
    _expect(cfg, "training.seed", int, required=False)
    _expect(cfg, "training.loss_fn.class", str, required=False, choices=LOSSES)
    _expect(cfg, "training.loss_fn.kwargs", dict, required=False)
    _expect(cfg, "training.gd.opt.class", str, choices=OPTIMIZERS)
    opt_kwargs = _expect(cfg, "training.gd.opt.kwargs", dict)
    for key in ("lr", "momentum", "weight_decay", "pact_decay"):
        _expect(cfg, f"training.gd.opt.kwargs.{key}", (int, float), required=(key == "lr"))
    if opt_kwargs["lr"] <= 0:
        raise ConfigError("training.gd.opt.kwargs.lr", f"learning rate must be > 0, got {opt_kwargs['lr']}")
    _expect(cfg, "training.gd.opt.takes_net", bool, required=False)
    sched = _expect(cfg, "training.gd.lr_sched", (dict, type(None)), required=False)
    if sched:
        _expect(cfg, "training.gd.lr_sched.class", str, choices=SCHEDULERS)
        _expect(cfg, "training.gd.lr_sched.kwargs", dict, required=False)
        if sched["class"] == "HandScheduler":
            schedule = _expect(cfg, "training.gd.lr_sched.kwargs.schedule", dict)
            for epoch, factor in schedule.items():
                if not str(epoch).isdigit() or not isinstance(factor, (int, float)) or isinstance(factor, bool):
                    raise ConfigError(f"training.gd.lr_sched.kwargs.schedule.{epoch}",
                                      "expected {\"<epoch>\": <lr factor>} entries", 'e.g. {"0": 1, "3": 0.1}')
    _expect(cfg, "training.quantize", (dict, type(None)), required=False)
    _expect(cfg, "training.amp", bool, required=False)
    _expect(cfg, "training.channels_last", bool, required=False)
    _expect(cfg, "training.sync_bn", bool, required=False)
