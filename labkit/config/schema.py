"""The config schema: every section, key, type and value range, checked before anything is built.

:func:`validate` walks a config against :data:`SCHEMA` and raises :class:`ConfigError` at the first problem,
naming the key path (``training.gd.opt.kwargs.lr``), what is wrong and the fix; an unknown key gets the
nearest valid one (``trainig`` -> did you mean 'training'?). ``network.quantize`` is checked setting by
setting through :class:`labkit.config.spec.QuantSpec` (the same rules the layers apply), regexes are compiled;
whether a regex names a module of the network is checked when the network is built
(:func:`labkit.train.build.build_network`), before anything is written. Torch-free: the CLI checks a config
before it imports torch.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.config.errors import LabkitError
from labkit.config.spec import QuantSpec, SpecError, settings_of

DATASETS = ("embedded", "imagenet")
NETWORKS = ("MobileNetV2",)
STRIDE_CONFIGS = ("standard", "small")  # labkit.models.STRIDE_TABLES (a test keeps them equal)
LOSSES = ("CrossEntropyLoss",)
OPTIMIZERS = ("SGD", "Adam", "AdamW", "PACTSGD", "PACTAdam")
SCHEDULERS = ("HandScheduler", "StepLR", "MultiStepLR", "CosineAnnealingLR", "OneCycleLR")
COMMANDS = ("start", "freeze", "thaw", "stop", "verbose_on", "verbose_off")
#: ``network.quantize`` class keys and the quantizer role of what they build
QUANTIZE_CLASSES = {"PACTConv2d": "weights", "PACTLinear": "weights", "PACTUnsignedAct": "unsigned_act"}
HARMONIZE_OPTIONS = ("requant_pool", "force_out_eps", "layers")
#: keyword arguments of the reference's ``pact_recipe`` (beside ``config``), as in its MobileNet recipes
RECIPE_KWARGS = ("quantize_pool", "precision_spec_file", "finetuning_ckpt")
MIN_BITS, MAX_BITS = 2, 16


class ConfigError(LabkitError, ValueError):
    """A configuration problem; ``key_path`` names where it is (``training.gd.opt.class``)."""

    def __init__(self, key_path: str, problem: str, fix: str = ""):
        self.key_path = key_path
        message = f"config key '{key_path}': {problem}" if key_path else problem
        super().__init__(f"{message}. {fix}".rstrip(". ") + ("." if fix else ""))


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class Value:
    """A leaf: allowed types (``bool`` only when listed), choices, and a range check returning a problem."""

    types: tuple
    required: bool = False
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None


@dataclass
class Section:
    """An object with known keys; ``each`` validates the values of any other key (maps such as schedules),
    ``check`` the whole object after its keys."""

    keys: dict = field(default_factory=dict)
    required: bool = False
    nullable: bool = False
    each: Any = None
    each_key: Callable[[str], str | None] | None = None
    check: Callable[[dict, str], None] | None = None


ANY = object()  # any JSON value (meters, free-form kwargs)

NUM = (int, float)


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Callable[[Any], str | None]:
    def check(v) -> str | None:
        if not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
        return None
    return check


def _epoch_key(key: str) -> str | None:
    return None if str(key).isdigit() else "epoch keys are non-negative integers in quotes, e.g. \"3\""


def _commands(value: Any, path: str, allowed: tuple = COMMANDS) -> None:
    cmds = [value] if isinstance(value, str) else value
    if not isinstance(cmds, list) or not all(isinstance(c, str) for c in cmds):
        raise ConfigError(path, f"expected a command or a list of commands, got {value!r}", f"Commands: {', '.join(allowed)}")
    for c in cmds:
        if c not in allowed:
            raise ConfigError(path, f"unknown command {c!r}{_suggest(c, allowed)}", f"Commands: {', '.join(allowed)}")


_SPLIT = Section({
    "dataset": Section({
        "transform": Section({"class": Value((str,)), "kwargs": Section({"augment": Value((bool,))})}),
        "limit": Value((int, type(None)), check=_range(1)),
    }),
    "dataloader": Section({"bs": Value((int,), check=_range(1)), "num_workers": Value((int,), check=_range(0))}),
})

_START_KWARGS = Section({"init_clip_hi": Value(NUM, check=_range()), "init_clip_lo": Value(NUM, check=_range())})
#: commands of the batch-norm schedule (labkit's ``schedules.batchnorm``; quantizer commands do not apply)
BN_COMMANDS = ("freeze", "thaw", "verbose_on", "verbose_off")
_CONTROLLERS = Section({
    "schedules": Section({"linear": Section(each=ANY, each_key=_epoch_key),
                          "activation": Section(each=ANY, each_key=_epoch_key),
                          "batchnorm": Section(each=ANY, each_key=_epoch_key)}, required=True),
    "kwargs_linear": _START_KWARGS, "kwargs_activation": _START_KWARGS,
    "kwargs_batchnorm": Section({"recalibration_batches": Value((int,), check=_range(0))}),
})

_SCHEDULER_KWARGS = {
    "HandScheduler": Section({"schedule": Section(each=Value(NUM, check=_range(0)), each_key=_epoch_key,
                                                  required=True)}),
    "StepLR": Section({"step_size": Value((int,), True, check=_range(1)), "gamma": Value(NUM, check=_range(0, lo_open=True))}),
    "MultiStepLR": Section({"milestones": Value((list,), True), "gamma": Value(NUM, check=_range(0, lo_open=True))}),
    "CosineAnnealingLR": Section({"T_max": Value((int,), check=_range(1)), "eta_min": Value(NUM, check=_range(0))}),
    "OneCycleLR": Section({"max_lr": Value(NUM, True, check=_range(0, lo_open=True)),
                           "pct_start": Value(NUM, check=_range(0, 1, True, True)),
                           "anneal_strategy": Value((str,), choices=("cos", "linear")),
                           "div_factor": Value(NUM, check=_range(0, lo_open=True)),
                           "final_div_factor": Value(NUM, check=_range(0, lo_open=True)),
                           "three_phase": Value((bool,)), "cycle_momentum": Value((bool,)),
                           "base_momentum": Value(NUM, check=_range(0, 1)), "max_momentum": Value(NUM, check=_range(0, 1))}),
}

SCHEMA = Section({
    "description": Value((str,)), "name": Value((str,)), "meters": ANY,
    "data": Section({
        "name": Value((str,), True, choices=DATASETS),
        "root": Value((str, type(None))),
        "image_size": Value((int,), check=_range(16, 4096)),
        "train": _SPLIT, "valid": _SPLIT,
    }, required=True),
    "network": Section({
        "class": Value((str,), True, choices=NETWORKS),
        "kwargs": Section({
            "capacity": Value(NUM, check=_range(0, 4, lo_open=True)),
            "num_classes": Value((int,), check=_range(2)),
            "config": Value((str,), choices=STRIDE_CONFIGS),
            "dropout": Value(NUM, check=_range(0, 1, hi_open=True)),
            "seed": Value((int,)),
        }, required=True),
        "pretrained": Value((str, type(None))),
        "quantize": ANY,  # checked by check_quantize
    }, required=True),
    "training": Section({
        "n_epochs": Value((int,), True, check=_range(1)),
        "seed": Value((int,)),
        "loss_fn": Section({"class": Value((str,), choices=LOSSES),
                            "kwargs": Section({"label_smoothing": Value(NUM, check=_range(0, 1, hi_open=True))})}),
        "gd": Section({
            "opt": Section({
                "class": Value((str,), True, choices=OPTIMIZERS),
                "takes_net": Value((bool,)),
                "kwargs": Section({
                    "lr": Value(NUM, True, check=_range(0, lo_open=True)),
                    "momentum": Value(NUM, check=_range(0, 1, hi_open=True)),
                    "weight_decay": Value(NUM, check=_range(0)),
                    "pact_decay": Value(NUM, check=_range(0)),
                    "nesterov": Value((bool,)), "dampening": Value(NUM, check=_range(0, 1)),
                    "betas": Value((list,)), "eps": Value(NUM, check=_range(0, lo_open=True)),
                }, required=True),
            }, required=True),
            "lr_sched": Section({"class": Value((str,), True, choices=SCHEDULERS), "kwargs": ANY}, nullable=True),
        }, required=True),
        "quantize": ANY,  # checked by check_controllers
        "amp": Value((bool,)), "channels_last": Value((bool,)), "sync_bn": Value((bool,)),
    }, required=True),
})


# ----------------------------------------------------------------------------------------------- checks
def validate(cfg: dict) -> None:
    """Raise :class:`ConfigError` at the first problem of ``cfg`` (a config after overrides)."""
    if not isinstance(cfg, dict):
        raise ConfigError("", "a config must be a JSON object")
    _walk(cfg, SCHEMA, "")
    if cfg["data"]["name"] == "imagenet" and not cfg["data"].get("root"):
        raise ConfigError("data.root", "is missing: the ImageNet dataset needs its folder (train/ and val/)",
                          "Set it in the config or pass --data-root DIR")
    sched = cfg["training"]["gd"].get("lr_sched")
    if sched:
        _walk(sched.get("kwargs") or {}, _SCHEDULER_KWARGS[sched["class"]], "training.gd.lr_sched.kwargs")
        if sched["class"] == "MultiStepLR":
            ms = sched["kwargs"]["milestones"]
            if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in ms) or ms != sorted(ms):
                raise ConfigError("training.gd.lr_sched.kwargs.milestones", f"expected increasing epochs, got {ms!r}")
    betas = cfg["training"]["gd"]["opt"]["kwargs"].get("betas")
    if betas is not None and not (len(betas) == 2 and all(isinstance(b, NUM) and 0 <= b < 1 for b in betas)):
        raise ConfigError("training.gd.opt.kwargs.betas", f"expected two numbers in [0, 1), got {betas!r}")
    quantize = cfg["network"].get("quantize")
    if quantize is not None:
        check_quantize(quantize)
    controllers = cfg["training"].get("quantize")
    if controllers is not None:
        check_controllers(controllers)
    if quantize and not controllers:
        raise ConfigError("training.quantize", "is missing: network.quantize replaces layers, but no schedule "
                          "starts their quantizers, so the run would train in float",
                          'Add e.g. {"schedules": {"linear": {"0": "start"}, "activation": {"1": "start"}}}')


def check_quantize(quantize: Any, where: str = "network.quantize") -> None:
    """The per-layer section, in either layout (the seed's, or ``{"function": "pact_recipe", "kwargs":
    {"config": ..., "quantize_pool": ..., "precision_spec_file": ..., "finetuning_ckpt": ...}}``): class keys,
    regexes, every layer's settings, the harmonize options, the reference recipe's keyword arguments (whether
    the files exist is checked when the network is built)."""
    if not isinstance(quantize, dict):
        raise ConfigError(where, f"expected an object, got {_type(quantize)}")
    if "function" in quantize:
        if quantize["function"] != "pact_recipe":
            raise ConfigError(f"{where}.function", f"unknown recipe {quantize['function']!r}", "The only one is 'pact_recipe'")
        _known(quantize, ("function", "kwargs"), where)
        kwargs = quantize.get("kwargs")
        if isinstance(kwargs, dict):
            _known(kwargs, ("config",) + RECIPE_KWARGS, f"{where}.kwargs")
        if not isinstance(kwargs, dict) or not isinstance(kwargs.get("config"), dict):
            raise ConfigError(f"{where}.kwargs.config", "must be an object with the PACTConv2d / PACTLinear / "
                              "PACTUnsignedAct / harmonize sections")
        _recipe_kwargs(kwargs, f"{where}.kwargs")
        quantize, where = kwargs["config"], f"{where}.kwargs.config"
    _known(quantize, tuple(QUANTIZE_CLASSES) + ("harmonize",), where)
    for class_key, role in QUANTIZE_CLASSES.items():
        section = quantize.get(class_key)
        if section is None:
            continue
        path = f"{where}.{class_key}"
        if not isinstance(section, dict):
            raise ConfigError(path, f"expected an object mapping module-name regexes to settings, got {_type(section)}")
        defaults = _settings(section.get("kwargs") or {}, role, f"{path}.kwargs")
        for regex, layer in section.items():
            if regex == "kwargs":
                continue
            _regex(regex, f"{path}[{regex!r}]")
            _settings({**defaults, **_settings(layer or {}, role, f"{path}[{regex!r}]")}, role, f"{path}[{regex!r}]")
    harmonize = quantize.get("harmonize")
    if harmonize is None or isinstance(harmonize, bool):
        return
    path = f"{where}.harmonize"
    if not isinstance(harmonize, dict):
        raise ConfigError(path, f"expected an object of settings, true or false; got {harmonize!r}")
    for key in ("requant_pool", "force_out_eps"):
        if key in harmonize and not isinstance(harmonize[key], bool):
            raise ConfigError(f"{path}.{key}", f"expected true or false, got {harmonize[key]!r}")
    settings = {k: v for k, v in harmonize.items() if k not in HARMONIZE_OPTIONS}
    _settings(settings, "signed_act", path, extra=HARMONIZE_OPTIONS)
    layers = harmonize.get("layers") or {}
    if not isinstance(layers, dict):
        raise ConfigError(f"{path}.layers", f"expected an object mapping regexes on inserted names to settings, "
                          f"got {_type(layers)}")
    for regex, layer in layers.items():
        _regex(regex, f"{path}.layers[{regex!r}]")
        _settings({**settings, **(layer or {})}, "signed_act", f"{path}.layers[{regex!r}]")


def _recipe_kwargs(kwargs: dict, where: str) -> None:
    """``quantize_pool`` (true/false: ``harmonize.requant_pool``), ``precision_spec_file`` and
    ``finetuning_ckpt`` (paths or null)."""
    for key in ("precision_spec_file", "finetuning_ckpt"):
        if kwargs.get(key) is not None and not (isinstance(kwargs[key], str) and kwargs[key]):
            raise ConfigError(f"{where}.{key}", f"expected a file path or null, got {_type(kwargs[key])} "
                              f"({kwargs[key]!r})")
    pool = kwargs.get("quantize_pool")
    if pool is None:
        return
    if not isinstance(pool, bool):
        raise ConfigError(f"{where}.quantize_pool", f"expected true or false, got {pool!r}")
    harmonize = kwargs["config"].get("harmonize")
    if harmonize is False and pool:
        raise ConfigError(f"{where}.quantize_pool", "is true, but config.harmonize is false (no harmonization, "
                          "so nothing re-quantizes the pool)", "Drop one of them")
    if isinstance(harmonize, dict) and harmonize.get("requant_pool", pool) != pool:
        raise ConfigError(f"{where}.quantize_pool", f"is {str(pool).lower()} but config.harmonize.requant_pool "
                          f"is {str(harmonize['requant_pool']).lower()} (both say whether the pool's output is "
                          "re-quantized)", "Keep one of them")


def check_controllers(quantize: Any, where: str = "training.quantize") -> None:
    """``training.quantize``: ``{"function": "get_pact_controllers", "kwargs": {...}}`` or the kwargs alone."""
    if not isinstance(quantize, dict):
        raise ConfigError(where, f"expected an object, got {_type(quantize)}")
    if "function" in quantize:
        if quantize["function"] != "get_pact_controllers":
            raise ConfigError(f"{where}.function", f"unknown controller factory {quantize['function']!r}",
                              "The only one is 'get_pact_controllers'")
        _known(quantize, ("function", "kwargs"), where)
        quantize, where = quantize.get("kwargs") or {}, f"{where}.kwargs"
    _walk(quantize, _CONTROLLERS, where)
    for group, schedule in quantize["schedules"].items():
        for epoch, cmds in schedule.items():
            _commands(cmds, f"{where}.schedules.{group}.{epoch}", BN_COMMANDS if group == "batchnorm" else COMMANDS)


def bits_of(n_levels: int) -> int:
    """``ceil(log2 n_levels)``."""
    return math.ceil(math.log2(n_levels))


# ----------------------------------------------------------------------------------------------- walking
def _walk(node: Any, schema: Any, path: str) -> None:
    if schema is ANY:
        return
    if isinstance(schema, Value):
        _value(node, schema, path)
        return
    if node is None and schema.nullable:
        return
    if not isinstance(node, dict):
        raise ConfigError(path, f"expected an object, got {_type(node)}")
    if schema.keys:
        unknown = [k for k in node if k not in schema.keys]
        if unknown and schema.each is None:
            _known(node, tuple(schema.keys), path)
    for key, sub in schema.keys.items():
        child = _join(path, key)
        if key not in node:
            if getattr(sub, "required", False):
                raise ConfigError(child, "is missing")
            continue
        _walk(node[key], sub, child)
    if schema.each is not None:
        for key, value in node.items():
            if key in schema.keys:
                continue
            if schema.each_key and (problem := schema.each_key(key)):
                raise ConfigError(_join(path, key), problem)
            _walk(value, schema.each, _join(path, key))
    if schema.check:
        schema.check(node, path)


def _value(value: Any, schema: Value, path: str) -> None:
    types = schema.types
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(path, f"expected {_names(types)}, got a boolean ({str(value).lower()})")
    if not isinstance(value, types):
        raise ConfigError(path, f"expected {_names(types)}, got {_type(value)} ({value!r})")
    if schema.choices is not None and value not in schema.choices:
        raise ConfigError(path, f"unknown value {value!r}{_suggest(str(value), schema.choices)}",
                          f"Choose one of: {', '.join(map(str, schema.choices))}")
    if schema.check and value is not None and not isinstance(value, (str, list)):
        problem = schema.check(value)
        if problem:
            raise ConfigError(path, problem)


def _settings(settings: Any, role: str, path: str, extra: tuple = ()) -> dict:
    """Check one layer's quantizer settings through :class:`QuantSpec`; returns them."""
    if not isinstance(settings, dict):
        raise ConfigError(path, f"expected an object of quantizer settings, got {_type(settings)} ({settings!r})")
    allowed = set(settings_of(role)) | ({"symm_wts"} if role == "weights" else set())
    for key in settings:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}", f"unknown quantizer setting{_suggest(key, sorted(allowed | set(extra)))}",
                              f"Settings of {role}: {', '.join(sorted(allowed))}")
    try:
        QuantSpec.for_role(role, **settings)
    except (SpecError, TypeError) as err:
        raise ConfigError(path, str(err)) from None
    return settings


def _regex(regex: str, path: str) -> None:
    try:
        re.compile(regex)
    except re.error as err:
        raise ConfigError(path, f"not a valid regular expression ({err})",
                          "Escape dots as '\\\\.' or anchor with '$'") from None


def _known(node: dict, keys: tuple, path: str) -> None:
    for key in node:
        if key not in keys:
            raise ConfigError(_join(path, key), f"unknown key{_suggest(key, keys)}", f"Known here: {', '.join(keys)}")


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
             bool: "true/false", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))
