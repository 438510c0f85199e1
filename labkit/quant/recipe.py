"""The per-layer quantization recipe: ``network.quantize`` config -> fake-quantized, harmonized network.

``quantize_config`` is the ``network.quantize`` section, in either layout:

(a) the seed's: ``{"PACTConv2d": {...}, "PACTLinear": {...}, "PACTUnsignedAct": {...}, "harmonize": {...}}``
(b) the reference framework's: ``{"function": "pact_recipe", "kwargs": {"config": <layout a>, ...}}``, whose
    other keyword arguments mean what they mean in the reference's MobileNet recipes:

    ``quantize_pool``        true/false: re-quantize the average pool's output, i.e.
                             ``harmonize.requant_pool`` (absent: labkit's default, true; the reference's
                             default is false, so its MobileNetV2 has 35 unsigned activations and labkit's 36,
                             ``avgpool_act``)
    ``precision_spec_file``  a JSON file ``{"layer_levels": {name: n_levels}}`` (as the reference's Bayesian
                             Bits runs write it) overriding ``n_levels`` of the named layers: quantized convs,
                             linears, activations, and modules the harmonizer inserts (labkit's names,
                             ``features.2.integer_add``, ``avgpool_act``: see
                             :func:`labkit.quant.harmonize.plan`); ``module.`` prefixes and a trailing ``$``
                             are ignored; an unknown name is an error
    ``finetuning_ckpt``      weights loaded after the recipe (:func:`labkit.train.build.build_network`): a
                             state dict under ``net`` (``module.`` prefixes stripped) or a labkit checkpoint

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

``harmonize``: absent, ``null`` or ``true`` -> :func:`labkit.quant.harmonize.harmonize` runs with its defaults
(like the reference, which always harmonizes); an object -> runs with those kwargs; ``false`` -> skipped
(the network then is not fully integerizable; for experiments only). Its keys: ``requant_pool`` (default
true: re-quantize after the average pool), ``force_out_eps`` (adders), ``layers`` (``{regex on inserted
names: kwargs}``, e.g. ``{"avgpool_act$": {"n_levels": 256}}``) and the constructor kwargs of the inserted
quantizers (``n_levels``, ``init_clip``, ``learn_clip``, ``symm``, ``rounding``, ``tqt``, ``pow2`` ...).

Errors are raised before the network is touched (all layers are built first), as
:class:`~labkit.config.schema.ConfigError` naming the class key, the regex, the module and the fix.
"""

from __future__ import annotations

import copy
import difflib
import json
import re

from torch import nn

from labkit.config.paths import resolve
from labkit.config.schema import RECIPE_KWARGS, ConfigError, check_quantize
from labkit.config.spec import QuantSpec, SpecError
from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct
from labkit.quant.harmonize import harmonize as run_harmonize
from labkit.quant.harmonize import harmonized_layers
from labkit.quant.harmonize import plan as harmonize_plan

__all__ = ["pact_recipe", "normalize_quantize_config", "recipe_options", "read_precision_spec",
           "CLASS_TARGETS",
           "REPORT_FIELDS"]

#: class key -> (PACT class, float module types it replaces)
CLASS_TARGETS: dict[str, tuple[type, tuple[type, ...]]] = {
    "PACTConv2d": (PACTConv2d, (nn.Conv2d,)),
    "PACTLinear": (PACTLinear, (nn.Linear,)),
    "PACTUnsignedAct": (PACTUnsignedAct, (nn.ReLU, nn.ReLU6)),
}
_PACT_TYPES = (PACTConv2d, PACTLinear, PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)
#: columns of the per-layer report
REPORT_FIELDS = ("name", "type", "source", "n_levels", "bits", "per_channel", "init_clip", "learn_clip",
                 "tqt")


def pact_recipe(net: nn.Module, quantize_config: dict) -> tuple[nn.Module, list[dict]]:
    """Replace the configured layers of ``net`` in place, then harmonize; returns ``(net, report)``.

    The returned network is a :class:`torch.fx.GraphModule` when harmonization runs (the quantized layers
    keep their names, so state-dict keys are stable), else ``net`` itself. ``report`` is a list of plain
    dicts, one per quantized layer in network order and then one per module the harmonizer inserted, with the
    keys :data:`REPORT_FIELDS` (``source`` is ``"recipe"`` or ``"harmonize"``; ``bits`` = ceil(log2
    n_levels)).
    """
    config = normalize_quantize_config(quantize_config)
    spec_file = recipe_options(quantize_config).get("precision_spec_file")
    if not isinstance(net, nn.Module):
        raise TypeError(f"pact_recipe: expected a torch.nn.Module, got {type(net).__name__}")
    named = [(n, m) for n, m in net.named_modules() if n]
    index = {n: i for i, (n, _) in enumerate(named)}
    plan: dict[str, dict] = {}  # module name -> {class_key, regex, settings, float module}
    for class_key, section in config.items():
        if class_key != "harmonize":
            plan.update(_match_layers(net, named, class_key, section))
    hcfg = config.get("harmonize", True)
    hkwargs = {} if hcfg in (None, True, False) else dict(hcfg)
    if spec_file:
        _apply_precision_spec(net, plan, hkwargs if hcfg is not False else None, spec_file)
    _build_layers(plan)  # all built first: a bad setting leaves the network untouched
    for name, item in plan.items():
        _set_submodule(net, name, item["module"])
    report = [_report_row(name, item["module"], "recipe")
              for name, item in sorted(plan.items(), key=lambda kv: index[kv[0]])]
    if hcfg is False:
        return net, report
    try:
        net = run_harmonize(net, **hkwargs)
    except (TypeError, ValueError) as err:
        msg = str(err).removeprefix("harmonize: ").removeprefix("harmonize.")
        raise ConfigError("network.quantize.harmonize", msg) from None
    modules = dict(net.named_modules())
    for row in harmonized_layers(net):
        report.append(_report_row(row["name"], modules[row["name"]], "harmonize"))
    return net, report


def _match_layers(net: nn.Module, named: list, class_key: str, section: dict) -> dict[str, dict]:
    """The modules one class key's regexes pick (each module once), with their merged settings."""
    defaults = section.get("kwargs") or {}
    claimed: dict[str, str] = {}
    plan = {}
    for regex, layer in section.items():
        if regex == "kwargs":
            continue
        for name, module in _hits(net, named, class_key, regex):
            if name in claimed:
                raise ConfigError(f"network.quantize.{class_key}", f"module '{name}' is matched by both "
                                  f"{claimed[name]!r} and {regex!r}",
                                  "Make the regexes disjoint (anchor them with '$', escape dots as '\\.')")
            claimed[name] = regex
            settings = {**defaults, **(layer or {})}
            if class_key == "PACTUnsignedAct" and "act_kind" not in (layer or {}):
                settings["act_kind"] = "relu6" if isinstance(module, nn.ReLU6) else "relu"
            plan[name] = {"class_key": class_key, "regex": regex, "settings": settings, "float": module}
    return plan


def _hits(net: nn.Module, named: list, class_key: str, regex: str) -> list[tuple[str, nn.Module]]:
    """The float modules of the class key's target type that ``regex`` matches; errors name what it
    matched."""
    targets = CLASS_TARGETS[class_key][1]
    where = f"network.quantize.{class_key}[{regex!r}]"
    matches = [(n, m) for n, m in named if re.match(regex, n)]
    if not matches:
        raise ConfigError(where, f"the regex matches no module of {type(net).__name__}"
                          f"{_suggest(regex, [n for n, m in named if isinstance(m, targets)])}",
                          "Fix the name (regexes are matched from the start of the module name)")
    quantized = [n for n, m in matches if isinstance(m, _PACT_TYPES)]
    if quantized:
        raise ConfigError(where, f"module '{quantized[0]}' is already quantized "
                          f"({type(dict(matches)[quantized[0]]).__name__})",
                          "Apply the recipe to a freshly built float network")
    hits = [(n, m) for n, m in matches if isinstance(m, targets)]
    if not hits:
        found = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in matches[:3])
        right = [k for k, (_, t) in CLASS_TARGETS.items() if isinstance(matches[0][1], t)]
        kinds = " / ".join("nn." + t.__name__ for t in targets)
        raise ConfigError(where, f"{class_key} replaces {kinds} modules, but the regex matches {found}"
                          f"{' ...' if len(matches) > 3 else ''}",
                          f"Move the entry under '{right[0]}'" if right else f"Point it at {kinds} modules")
    return hits


def _build_layers(plan: dict[str, dict]) -> None:
    """Each planned layer's quantized module (``item["module"]``), on the float module's device and mode."""
    for name, item in plan.items():
        pact_cls = CLASS_TARGETS[item["class_key"]][0]
        module, settings = item["float"], item["settings"]
        try:
            new = pact_cls(**settings) if item["class_key"] == "PACTUnsignedAct" else \
                pact_cls.from_float(module, **settings)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"network.quantize.{item['class_key']}[{item['regex']!r}]",
                              f"module '{name}': {err}",
                              "Fix this layer's settings or the class's 'kwargs' defaults") from None
        params = list(module.parameters()) + list(module.buffers())
        if params:
            new.to(params[0].device)
        new.train(module.training)
        item["module"] = new


def normalize_quantize_config(quantize_config: dict) -> dict:
    """Either layout -> a deep copy in the seed's layout (a), after
    :func:`labkit.config.schema.check_quantize` (every class key, regex, layer setting and harmonize option;
    :class:`ConfigError` naming the key); the reference's ``quantize_pool`` becomes
    ``harmonize.requant_pool``."""
    check_quantize(quantize_config)
    config = copy.deepcopy(quantize_config)
    if "function" not in config:
        return config
    out = config["kwargs"]["config"]
    pool = config["kwargs"].get("quantize_pool")
    if pool is not None and out.get("harmonize") is not False:
        harmonize = out.get("harmonize")
        out["harmonize"] = {**(harmonize if isinstance(harmonize, dict) else {}), "requant_pool": pool}
    return out


def recipe_options(quantize_config: dict) -> dict:
    """The reference layout's recipe keyword arguments that are set (``quantize_pool``,
    ``precision_spec_file``, ``finetuning_ckpt``); ``{}`` for the seed's layout."""
    if not isinstance(quantize_config, dict) or "function" not in quantize_config:
        return {}
    kwargs = quantize_config.get("kwargs") or {}
    return {k: kwargs[k] for k in RECIPE_KWARGS if kwargs.get(k) is not None}


def read_precision_spec(path: str, where: str = "network.quantize.kwargs.precision_spec_file") -> dict[str,
                                                                                                       int]:
    """``{module name: n_levels}`` from a ``{"layer_levels": {name: n_levels}}`` file; ``module.`` prefixes
    (of every name, as the reference) and a trailing ``$`` (the reference's config-key spelling) are dropped.
    A missing or malformed file, or a value that is no valid ``n_levels``, is a :class:`ConfigError` at
    ``where``."""
    file = resolve(path)
    if not file.is_file():
        raise ConfigError(where, f"file '{path}' not found", "Fix the path (relative paths are read from the "
                          "current directory, else from the project root) or remove the key")
    try:
        levels = json.loads(file.read_text()).get("layer_levels")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(where, f"'{file}' is not a JSON object ({err})",
                          'Write {"layer_levels": {...}}') from None
    if not isinstance(levels, dict):
        raise ConfigError(where, f"'{file}' has no \"layer_levels\" object", 'Write {"layer_levels": '
                          '{"features.3.residual_branch.1.0": 16, ...}}')
    if levels and all(k.startswith("module.") for k in levels):
        levels = {k[len("module."):]: v for k, v in levels.items()}
    out = {}
    for name, n in levels.items():
        try:
            QuantSpec.for_role("unsigned_act", n_levels=n)
        except SpecError as err:
            raise ConfigError(where, f"'{file}', layer '{name}': {err}") from None
        out[name[:-1] if name.endswith("$") else name] = n
    return out


# ---------------------------------------------------------------------------------------------------------
def _apply_precision_spec(net: nn.Module, plan: dict, hkwargs: dict | None, path: str) -> None:
    """``n_levels`` from the precision spec file into the recipe's ``plan`` (layers it quantizes) and into
    ``hkwargs["layers"]`` (modules the harmonizer will insert; ``hkwargs`` None: harmonization is off)."""
    where = "network.quantize.kwargs.precision_spec_file"
    levels = read_precision_spec(path, where)
    for name in [n for n in levels if n in plan]:
        plan[name]["settings"]["n_levels"] = levels.pop(name)
    if not levels:
        return
    inserted = [] if hkwargs is None else harmonize_plan(
        net, list(plan), requant_pool=hkwargs.get("requant_pool", True)).names
    modules = dict(net.named_modules())
    for name in levels:
        if name not in inserted:
            what = (f"'{name}' is a {type(modules[name]).__name__} that network.quantize does not quantize"
                    if name in modules else f"'{name}' names no module of {type(net).__name__}")
            raise ConfigError(where, f"{what} (in '{path}'); it can name the layers the config quantizes and "
                              f"the modules the harmonizer inserts ({', '.join(inserted) or 'none'})"
                              f"{_suggest(name, list(plan) + inserted)}", "Fix or remove that entry")
    layers = {}
    for regex, settings in (hkwargs.get("layers") or {}).items():
        hits = [n for n in inserted if re.match(regex, n)]
        if not any(n in levels for n in hits):
            layers[regex] = settings
            continue
        for name in hits:  # this regex's settings, per module, with the file's n_levels
            layers[re.escape(name) + "$"] = {**(settings or {}),
                                             **({"n_levels": levels[name]} if name in levels
                                                                      else {})}
    for name, n in levels.items():
        layers.setdefault(re.escape(name) + "$", {"n_levels": n})
    hkwargs["layers"] = layers


def _report_row(name: str, module: nn.Module, source: str) -> dict:
    spec = module.spec
    return {"name": name, "type": type(module).__name__, "source": source, "n_levels": spec.n_levels,
            "bits": spec.bits, "per_channel": spec.per_channel, "init_clip": spec.init_clip,
            "learn_clip": spec.learn_clip, "tqt": spec.tqt}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name.rstrip("$").replace("\\", ""), candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
