"""Load, override and validate the QuantLab-shaped JSON experiment configuration (torch-free).

Sections: ``data``, ``network`` {class, kwargs, pretrained, quantize}, ``training`` {loss_fn, gd {opt,
lr_sched}, n_epochs, quantize, seed, amp, channels_last, sync_bn, ema}, plus ``meters``, ``description`` and
``name``. :mod:`labkit.config.schema` checks every key, type and range; every error names the offending key
path, e.g. ``training.gd.opt.class``, and unknown keys get the nearest valid one.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labkit.config.paths import resolve
from labkit.config.schema import ConfigError, Data, validate

__all__ = ["ConfigError", "load_config", "read_config_file", "resolve_config", "config_name", "set_key",
           "get_key",
           "parse_override", "config_diff"]


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                check_files: bool = True) -> dict:
    """Read ``path``, apply dotted-key ``overrides`` (``{"data.root": "/imagenet"}``), validate, return.

    ``check_files=False`` leaves out the check that ``network.pretrained`` exists (for a caller that makes
    it).
    """
    path = resolve(path)
    return resolve_config(read_config_file(path), overrides, name=config_name(path), check_files=check_files)


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``, with errors that name the file, line and column."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("", f"'{path}' is a folder", "Pass a JSON config file in it, e.g. "
                          "configs/embedded/config.fp32.json")
    if not path.is_file():
        raise ConfigError("", f"config file '{path}' not found",
                          "Pass the path of a JSON config, e.g. configs/embedded/config.fp32.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("", f"'{path}' is not valid JSON (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("", f"config file '{path}' cannot be read ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError("", f"config file '{path}' must hold a JSON object at the top level")
    return cfg


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
    given = get_key(cfg, "network.pretrained")
    _normalise(cfg)
    validate(cfg)
    pretrained = cfg["network"].get("pretrained")
    if pretrained and check_files and not Path(pretrained).is_file():
        where = "" if given == pretrained else f" (looked for '{pretrained}')"
        raise ConfigError("network.pretrained", f"checkpoint file '{given}' not found{where}",
                          "Train the FP32 network first (labkit train configs/<data>/config.fp32.json), "
                          "convert torchvision weights with `labkit convert`, or override it "
                          "(--pretrained PATH, or none to start from scratch)")
    return cfg


def set_key(cfg: dict, key_path: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``key_path = "a.b.c"``, creating missing objects (unknown keys are
    then reported by validation, with the nearest valid one)."""
    *parents, leaf = key_path.split(".")
    if not key_path or not all(parents + [leaf]):
        raise ConfigError(key_path, "is not a dotted key path", "Write e.g. training.n_epochs=3")
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
        raise ConfigError("", f"override '{text}' is not of the form key.path=value",
                          "Write e.g. --set training.n_epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


#: config keys that hold file or folder paths (relative ones resolve by :func:`labkit.config.paths.resolve`)
PATH_KEYS = ("network.pretrained", "network.quantize.kwargs.precision_spec_file",
             "network.quantize.kwargs.finetuning_ckpt", "data.root")


def config_diff(a: dict, b: dict, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(key_path, value in a, value in b)`` for every leaf that differs (missing: ``None``); a path under
    ``PATH_KEYS`` spelled two ways (relative from the project root, absolute) that names one file is no
    difference."""
    return [d for d in _diff(a, b, path) if not (d[0] in PATH_KEYS and _same_file(d[1], d[2]))]


def _same_file(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return resolve(a).resolve(strict=True) == resolve(b).resolve(strict=True)
    except OSError:
        return False


def _diff(a: Any, b: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    elif a != b:
        yield path, a, b


def _normalise(cfg: dict) -> None:
    network = cfg.get("network")
    if isinstance(network, dict):
        kwargs = network.get("kwargs")
        # the reference framework keeps the checkpoint path under network.kwargs.pretrained
        if isinstance(kwargs, dict) and "pretrained" in kwargs:
            pretrained = kwargs.pop("pretrained")
            network.setdefault("pretrained", pretrained)
        if isinstance(network.get("pretrained"), str):
            network["pretrained"] = str(resolve(network["pretrained"]))
        recipe = network.get("quantize", {}).get("kwargs") if isinstance(network.get("quantize"),
                                                                         dict) else None
        for key in ("precision_spec_file", "finetuning_ckpt"):  # the reference recipe's file arguments
            if isinstance(recipe, dict) and isinstance(recipe.get(key), str) and recipe[key]:
                recipe[key] = str(resolve(recipe[key]))
    data = cfg.get("data")
    if isinstance(data, dict):
        data.setdefault("name", Data.model_fields["name"].default)
        if isinstance(data.get("root"), str):
            data["root"] = str(resolve(data["root"]))
