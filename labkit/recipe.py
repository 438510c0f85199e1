"""The per-layer quantization recipe: ``network.quantize`` config -> fake-quantized, harmonized network.

``quantize_config`` is the ``network.quantize`` section, in either layout:

(a) the seed's: ``{"PACTConv2d": {...}, "PACTLinear": {...}, "PACTUnsignedAct": {...}, "harmonize": {...}}``
(b) the reference framework's: ``{"function": "pact_recipe", "kwargs": {"config": <layout a>}}``

Per class, keys are regular expressions on hierarchical module names, matched from the start (``re.match``,
``$`` anchors allowed: ``"features.3.residual_branch.1.0$"``), mapping to constructor kwargs; the key
``kwargs`` holds the class defaults, used where a layer's dict lacks a key. Targets:

=================== ============================ =====================================================
class key           replaces                     built with
=================== ============================ =====================================================
``PACTConv2d``      ``nn.Conv2d``                ``PACTConv2d.from_float(conv, **kwargs)``
``PACTLinear``      ``nn.Linear``                ``PACTLinear.from_float(linear, **kwargs)``
``PACTUnsignedAct`` ``nn.ReLU``, ``nn.ReLU6``    ``PACTUnsignedAct(act_kind='relu'|'relu6', **kwargs)``
=================== ============================ =====================================================

A regex may match containers and other modules too (``"features.2"``): it applies to the modules of the
class's target type among its matches. Modules no regex names stay in float. ``act_kind`` comes from the
replaced module unless the layer's own dict sets it.

``harmonize``: absent, ``null`` or ``true`` -> :func:`labkit.harmonize.harmonize` runs with its defaults
(like the reference, which always harmonizes); an object -> runs with those kwargs; ``false`` -> skipped
(the network then is not fully integerizable; for experiments only). Its keys: ``requant_pool`` (default
true: re-quantize after the average pool), ``force_out_eps`` (adders), ``layers`` (``{regex on inserted
names: kwargs}``, e.g. ``{"avgpool_act$": {"n_levels": 256}}``) and the constructor kwargs of the inserted
quantizers (``n_levels``, ``init_clip``, ``learn_clip``, ``symm``, ``rounding``, ``tqt``, ``pow2`` ...).

Errors are raised before the network is touched (all layers are built first), as ``ValueError`` /
``TypeError`` naming the class key, the regex, the module and the fix.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from typing import Any

from torch import nn

from labkit.harmonize import harmonize as run_harmonize
from labkit.harmonize import harmonized_layers
from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct

__all__ = ["pact_recipe", "normalize_quantize_config", "default_quantize_config", "CLASS_TARGETS",
           "REPORT_FIELDS"]

#: class key -> (PACT class, float module types it replaces)
CLASS_TARGETS: dict[str, tuple[type, tuple[type, ...]]] = {
    "PACTConv2d": (PACTConv2d, (nn.Conv2d,)),
    "PACTLinear": (PACTLinear, (nn.Linear,)),
    "PACTUnsignedAct": (PACTUnsignedAct, (nn.ReLU, nn.ReLU6)),
}
_PACT_TYPES = (PACTConv2d, PACTLinear, PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)
#: columns of the per-layer report
REPORT_FIELDS = ("name", "type", "source", "n_levels", "bits", "per_channel", "init_clip", "learn_clip", "tqt")


def pact_recipe(net: nn.Module, quantize_config: dict) -> tuple[nn.Module, list[dict]]:
    """Replace the configured layers of ``net`` in place, then harmonize; returns ``(net, report)``.

    The returned network is a :class:`torch.fx.GraphModule` when harmonization runs (the quantized layers
    keep their names, so state-dict keys are stable), else ``net`` itself. ``report`` is a list of plain
    dicts, one per quantized layer in network order and then one per module the harmonizer inserted, with the
    keys :data:`REPORT_FIELDS` (``source`` is ``"recipe"`` or ``"harmonize"``; ``bits`` = ceil(log2 n_levels)).
    """
    config = normalize_quantize_config(quantize_config)
    if not isinstance(net, nn.Module):
        raise TypeError(f"pact_recipe: expected a torch.nn.Module, got {type(net).__name__}")
    named = [(n, m) for n, m in net.named_modules() if n]
    index = {n: i for i, (n, _) in enumerate(named)}

    plan: dict[str, dict] = {}  # module name -> {class_key, regex, kwargs, module}
    for class_key, section in config.items():
        if class_key == "harmonize":
            continue
        pact_cls, targets = CLASS_TARGETS[class_key]
        defaults = section.get("kwargs") or {}
        if not isinstance(defaults, dict):
            raise TypeError(f"network.quantize.{class_key}.kwargs must be an object of constructor kwargs, "
                            f"got {type(defaults).__name__}")
        claimed: dict[str, str] = {}
        for regex, layer_kwargs in section.items():
            if regex == "kwargs":
                continue
            where = f"network.quantize.{class_key}[{regex!r}]"
            if layer_kwargs is None:
                layer_kwargs = {}
            if not isinstance(layer_kwargs, dict):
                raise TypeError(f"{where}: expected an object of {class_key} kwargs, got "
                                f"{type(layer_kwargs).__name__} ({layer_kwargs!r})")
            try:
                pattern = re.compile(regex)
            except re.error as err:
                raise ValueError(f"{where}: not a valid regular expression ({err})") from err
            matches = [(n, m) for n, m in named if pattern.match(n)]
            if not matches:
                raise ValueError(f"{where}: the regex matches no module of {type(net).__name__}"
                                 f"{_suggest(regex, [n for n, m in named if isinstance(m, targets)])}. "
                                 "Fix the name (regexes are matched from the start of the module name)")
            quantized = [n for n, m in matches if isinstance(m, _PACT_TYPES)]
            if quantized:
                raise ValueError(f"{where}: module '{quantized[0]}' is already quantized "
                                 f"({type(dict(matches)[quantized[0]]).__name__}); apply the recipe to a "
                                 "freshly built float network")
            hits = [(n, m) for n, m in matches if isinstance(m, targets)]
            if not hits:
                found = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in matches[:3])
                right = [k for k, (_, t) in CLASS_TARGETS.items() if isinstance(matches[0][1], t)]
                hint = f"move the entry under '{right[0]}'" if right else \
                    f"point it at {' / '.join('nn.' + t.__name__ for t in targets)} modules"
                raise TypeError(f"{where}: {class_key} replaces {' / '.join('nn.' + t.__name__ for t in targets)}"
                                f" modules, but the regex matches {found}{' ...' if len(matches) > 3 else ''}; "
                                f"{hint}")
            for name, module in hits:
                if name in claimed:
                    raise ValueError(f"network.quantize.{class_key}: module '{name}' is matched by both "
                                     f"{claimed[name]!r} and {regex!r}; make the regexes disjoint (anchor "
                                     "them with '$', escape dots as '\\.')")
                claimed[name] = regex
                kwargs = {**defaults, **layer_kwargs}
                if class_key == "PACTUnsignedAct" and "act_kind" not in layer_kwargs:
                    kwargs["act_kind"] = "relu6" if isinstance(module, nn.ReLU6) else "relu"
                _check_n_levels(kwargs, f"{where} (module '{name}')")
                plan[name] = {"class_key": class_key, "regex": regex, "kwargs": kwargs, "float": module}

    # build everything first: a bad kwarg leaves the network untouched
    for name, item in plan.items():
        pact_cls = CLASS_TARGETS[item["class_key"]][0]
        module, kwargs = item["float"], item["kwargs"]
        try:
            if item["class_key"] == "PACTUnsignedAct":
                new = pact_cls(**kwargs)
            else:
                new = pact_cls.from_float(module, **kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"network.quantize.{item['class_key']}[{item['regex']!r}] (module '{name}'): "
                            f"{err}. Fix this layer's kwargs or the class's 'kwargs' defaults") from err
        params = list(module.parameters()) + list(module.buffers())
        if params:
            new.to(params[0].device)
        new.train(module.training)
        item["module"] = new
    for name, item in plan.items():
        _set_submodule(net, name, item["module"])

    report = [_report_row(name, item["module"], item["kwargs"], "recipe")
              for name, item in sorted(plan.items(), key=lambda kv: index[kv[0]])]

    hcfg = config.get("harmonize", True)
    if hcfg is False:
        return net, report
    hkwargs = {} if hcfg in (None, True) else dict(hcfg)
    try:
        net = run_harmonize(net, **hkwargs)
    except (TypeError, ValueError) as err:
        msg = str(err) if str(err).startswith("harmonize") else f"harmonize: {err}"
        raise type(err)(f"network.quantize.{msg}") from err
    modules = dict(net.named_modules())
    for row in harmonized_layers(net):
        report.append(_report_row(row["name"], modules[row["name"]], row["kwargs"], "harmonize"))
    return net, report


def normalize_quantize_config(quantize_config: dict) -> dict:
    """Either layout -> a deep copy in the seed's layout (a); raises on unknown keys and wrong shapes."""
    if not isinstance(quantize_config, dict):
        raise TypeError(f"network.quantize must be an object, got {type(quantize_config).__name__}")
    config = copy.deepcopy(quantize_config)
    if "function" in config:
        if config["function"] != "pact_recipe":
            raise ValueError(f"network.quantize.function: unknown recipe {config['function']!r}; the only one is "
                             "'pact_recipe'")
        extra = set(config) - {"function", "kwargs"}
        kwargs = config.get("kwargs") or {}
        extra |= {f"kwargs.{k}" for k in kwargs if k != "config"} if isinstance(kwargs, dict) else set()
        if extra:
            raise ValueError(f"network.quantize.{sorted(extra)[0]}: unknown key; the reference layout is "
                             '{"function": "pact_recipe", "kwargs": {"config": {...}}}')
        config = kwargs.get("config")
        if not isinstance(config, dict):
            raise TypeError("network.quantize.kwargs.config must be an object with the PACTConv2d / PACTLinear /"
                            " PACTUnsignedAct / harmonize sections")
    for key, section in config.items():
        if key == "harmonize":
            if section is not None and not isinstance(section, (bool, dict)):
                raise TypeError(f"network.quantize.harmonize must be an object of kwargs, true or false; got "
                                f"{section!r}")
            continue
        if key not in CLASS_TARGETS:
            raise ValueError(f"network.quantize: unknown class key {key!r}{_suggest(key, list(CLASS_TARGETS))}; "
                             f"known: {', '.join(CLASS_TARGETS)}, harmonize")
        if not isinstance(section, dict):
            raise TypeError(f"network.quantize.{key} must be an object mapping module-name regexes to kwargs, "
                            f"got {type(section).__name__}")
    return config


def default_quantize_config(net: nn.Module, w_bits: int = 8, a_bits: int = 8, *, tqt: bool = False,
                            pow2: bool = False, overrides: dict[str, int | dict] | None = None,
                            per_channel: bool = True, learn_clip: bool = True, requant_pool: bool = True,
                            weight_init: str | None = None) -> dict:
    """A full per-layer config (seed layout) listing every conv, linear and ReLU/ReLU6 of ``net``.

    Reference values (quantization facts §2): convs ``per_channel`` (``per_channel=False`` -> ``per_layer``),
    linear ``per_layer``, ``symm_wts``; weight init ``max`` at >= 8 bits, else ``sawb_asymm`` (the SAWB
    clip for almost-symmetric grids) unless ``weight_init`` says otherwise; weight bounds follow the weights
    (``learn_clip`` false) for PACT, are learned for TQT; activations ``init_clip const`` (the controllers'
    ``init_clip_hi``), ``rounding``, ``learn_clip`` (PACT learns alpha); inserted quantizers ``init_clip max``.
    ``tqt`` turns on TQT (learned log2 thresholds; ``pow2`` for the paper's power-of-two scales) everywhere.

    ``overrides`` maps exact module names to bits (``{"pilot.0": 8}``) or to kwargs dicts; names of modules
    the harmonizer will insert (``avgpool_act``, ``features.2.integer_add``, ``features.0.output_act``) go to
    ``harmonize.layers``. For a conv/linear the bits are the weights', for an activation the output's.
    """
    for what, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"default_quantize_config: {what} must be an integer >= 1, got {bits!r}")
    weight_init = weight_init or ("max" if w_bits >= 8 else "sawb_asymm")
    common = {"tqt": True, "pow2": pow2} if tqt else {"tqt": False}
    config: dict[str, Any] = {
        "PACTConv2d": {"kwargs": {"n_levels": 2 ** w_bits, "quantize": "per_channel" if per_channel else "per_layer",
                                  "init_clip": weight_init, "learn_clip": bool(tqt), "symm_wts": True, **common}},
        "PACTLinear": {"kwargs": {"n_levels": 2 ** w_bits, "quantize": "per_layer", "init_clip": weight_init,
                                  "learn_clip": bool(tqt), "symm_wts": True, **common}},
        "PACTUnsignedAct": {"kwargs": {"n_levels": 2 ** a_bits, "init_clip": "const", "learn_clip": learn_clip or tqt,
                                       "rounding": True, **common}},
        "harmonize": {"n_levels": 2 ** a_bits, "init_clip": "max", "learn_clip": learn_clip or tqt, "symm": True,
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
    for name, value in overrides.items():
        if name in names:
            raise ValueError(f"default_quantize_config: override '{name}' names a {type(names[name]).__name__}, "
                             "which is not quantized (only convs, linears and ReLU/ReLU6 are)")
        if not re.search(r"(integer_add|_act)(_\d+)?$", name):
            raise ValueError(f"default_quantize_config: override '{name}' names no module of "
                             f"{type(net).__name__} and no module the harmonizer inserts "
                             "(<block>.integer_add, <block>.output_act, avgpool_act)")
        layers[re.escape(name) + "$"] = _override_entry(overrides[name], name)
    if layers:
        config["harmonize"]["layers"] = layers
    return config


# ---------------------------------------------------------------------------------------------------------
def _override_entry(value: int | dict | None, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"default_quantize_config: override for '{name}' must be bits (an integer >= 1) or a "
                         f"kwargs dict, got {value!r}")
    return {"n_levels": 2 ** value}


def _layer_key(name: str, names: dict) -> str:
    """The reference's readable key (``features.3.residual_branch.1.0$``) if it picks only ``name``."""
    key = name + "$"
    if sum(1 for n in names if n and re.match(key, n)) == 1:
        return key
    return re.escape(name) + "$"


def _check_n_levels(kwargs: dict, where: str) -> None:
    if "n_levels" not in kwargs:
        return
    n = kwargs["n_levels"]
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{where}: n_levels must be an integer (e.g. 256 for 8 bits), got {n!r}")
    if n < 2:
        raise ValueError(f"{where}: n_levels must be >= 2 (a grid needs two levels), got {n}; use 2**bits")


def _report_row(name: str, module: nn.Module, kwargs: dict, source: str) -> dict:
    def value(key: str, default: Any = None) -> Any:
        if key in kwargs:
            return kwargs[key]
        attr = getattr(module, key, None)
        if isinstance(attr, (bool, int, float, str)):
            return attr
        return _signature_default(type(module), key, default)

    n_levels = value("n_levels")
    quantize = value("quantize")
    return {
        "name": name,
        "type": type(module).__name__,
        "source": source,
        "n_levels": n_levels,
        "bits": math.ceil(math.log2(n_levels)) if isinstance(n_levels, int) and n_levels >= 2 else None,
        "per_channel": quantize == "per_channel",
        "init_clip": value("init_clip"),
        "learn_clip": value("learn_clip"),
        "tqt": bool(value("tqt", False)),
    }


def _signature_default(cls: type, key: str, default: Any) -> Any:
    try:
        param = inspect.signature(cls.__init__).parameters.get(key)
    except (TypeError, ValueError):
        return default
    if param is None or param.default is inspect.Parameter.empty:
        return default
    return param.default


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _suggest(name: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name.rstrip("$").replace("\\", ""), candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
