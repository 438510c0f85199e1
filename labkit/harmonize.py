"""Harmonization: make a fake-quantized network integerizable (a torch.fx pass).

After :func:`labkit.recipe.pact_recipe` has swapped convs, linears and ReLUs for their PACT counterparts,
three kinds of tensors are still not on an integer grid. :func:`harmonize` traces the network and fixes them:

1. **Residual adds.** Every ``a + b`` (``operator.add``, ``torch.add``, ``Tensor.add``) between two tensors
   becomes a :class:`~labkit.quant.PACTIntegerAdd` submodule: one quantizer per input and one on the output,
   the inputs sharing one eps so their integer codes can be added. Named ``<scope>.integer_add`` after the
   module whose ``forward`` did the add (``features.2.integer_add`` in MobileNetV2).
2. **Linear op into linear op.** Where the output of a conv, batch norm or linear layer reaches a quantized
   conv/linear (:class:`~labkit.quant.PACTConv2d`, :class:`~labkit.quant.PACTLinear`) with no quantizer in
   between (only shape ops such as flatten/dropout), a signed :class:`~labkit.quant.PACTAsymmetricAct` is
   inserted right after the producer, and *every* user of the producer reads the quantized tensor (so the
   skip connection of the next block carries the same codes as its first conv). Named ``<module>.output_act`` after the outermost module whose output
   that tensor is (``features.0.output_act``: after the projection BN of a block without skip), else
   ``<producer>_act``. In MobileNetV2: blocks 0, 1, 3, 6, 10, 13, 16 -> 7 insertions.
3. **Average pool** (``requant_pool``, default **True**). The mean of integer codes is not an integer, so
   the classifier's input is re-quantized right after the pool (``avgpool_act``): unsigned
   (:class:`~labkit.quant.PACTUnsignedAct`, ``act_kind='relu'``) when the pool's input comes from an unsigned
   activation, signed otherwise. ``requant_pool=False`` reproduces the reference framework, which leaves
   avgpool -> flatten -> classifier in float. Only pools whose output reaches a quantized conv/linear count.

Only quantized convs/linears are treated as consumers that need an integer input: a layer left in float by
the config is left alone. Any other unquantized tensor that reaches a quantized layer (e.g. an activation the
config forgot) is reported with a ``UserWarning`` naming both layers. The network input is not quantized.

The result is a :class:`torch.fx.GraphModule` whose quantized layers keep their original hierarchical names
(``features.3.residual_branch.1.0``), so state dicts keep their keys; the inserted modules live under the
same hierarchy. Before the quantizers ``start`` (float mode) the harmonized network computes exactly what
the original did. Harmonizing an already harmonized network inserts nothing.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct

__all__ = ["harmonize", "QuantTracer", "harmonized_layers", "META_KEY"]

#: ``GraphModule.meta`` key under which :func:`harmonize` records what it inserted (survives deepcopy).
META_KEY = "labkit_harmonize"

QUANT_LINEAR = (PACTConv2d, PACTLinear)
QUANTIZERS = (PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.adaptive_avg_pool1d, torch.avg_pool1d}
# shape/regularisation ops that neither move values off a grid nor compute (followed transparently)
PASS_MODULES = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity)
PASS_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout}
PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
# harmonize() options that are not activation constructor kwargs
_OPTIONS = ("requant_pool", "force_out_eps", "layers", "leaf_types")


class QuantTracer(fx.Tracer):
    """FX tracer that keeps PACT modules (and ``leaf_types``) as leaves and records module scopes.

    Each node gets ``node.meta["labkit_scope"]``: the qualified name of the innermost module being traced
    through when the node was created (``""`` for the root). ``module_outputs`` maps a node to the names of
    the non-leaf modules whose ``forward`` returned it, innermost first.
    """

    def __init__(self, leaf_types: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.module_outputs: dict[fx.Node, list[str]] = {}
        self._scope: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QUANT_LINEAR + QUANTIZERS + self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self._scope.append(name)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._scope.pop()
        if isinstance(out, fx.Proxy):
            self.module_outputs.setdefault(out.node, []).append(name)
        return out

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["labkit_scope"] = self._scope[-1] if self._scope else ""
        return node


def harmonize(net: nn.Module, *, requant_pool: bool = True, force_out_eps: bool = False,
              layers: dict[str, dict] | None = None, leaf_types: Iterable[type] = (),
              **act_kwargs: Any) -> fx.GraphModule:
    """Trace ``net`` and insert integer adders, signed activations and the pool requantizer (module doc).

    ``act_kwargs`` (``n_levels``, ``init_clip``, ``learn_clip``, ``symm``, ``rounding``, ``tqt``, ...) go to
    every inserted quantizer: the :class:`PACTAsymmetricAct` s, the adders' quantizers
    (``PACTIntegerAdd(num_args=2, signed=True, force_out_eps=force_out_eps, **act_kwargs)``) and the pool
    requantizer (``symm`` is dropped for an unsigned one). ``layers`` maps regexes on the *inserted* names
    (``re.match``, e.g. ``"avgpool_act$"``) to kwargs overriding those defaults for the modules they match
    (mixed precision). ``leaf_types``: extra module classes not to trace into.

    Returns a new :class:`torch.fx.GraphModule` sharing the (already quantized) submodules of ``net``; what
    was inserted is listed in ``gm.meta[META_KEY]["inserted"]`` (see :func:`harmonized_layers`).
    """
    if not isinstance(requant_pool, bool):
        raise TypeError(f"harmonize: 'requant_pool' must be true or false, got {requant_pool!r}")
    if not isinstance(force_out_eps, bool):
        raise TypeError(f"harmonize: 'force_out_eps' must be true or false, got {force_out_eps!r}")
    layers = dict(layers or {})
    if not all(isinstance(v, dict) or v is None for v in layers.values()):
        raise TypeError("harmonize: 'layers' must map regexes on inserted module names to kwargs dicts, "
                        'e.g. {"avgpool_act$": {"n_levels": 256}}')

    tracer = QuantTracer(leaf_types)
    try:
        graph = tracer.trace(net)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"harmonize: torch.fx could not trace {type(net).__name__}: {err}. Data-dependent "
                           "control flow must live inside leaf modules; pass their classes as leaf_types"
                           ) from err
    gm = fx.GraphModule(tracer.root, graph, class_name=type(net).__name__)
    original = dict(net.named_modules())
    for name, module in gm.named_modules():  # fx's stand-in containers start in training mode
        if name in original:
            module.training = original[name].training
    modules = dict(gm.named_modules())
    taken = set(modules)
    previous = getattr(net, "meta", {}).get(META_KEY, {}) if isinstance(net, fx.GraphModule) else {}
    plans: list[dict] = []

    def new_name(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def target_of(node: fx.Node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None

    # pass 1: residual adds -> PACTIntegerAdd
    for node in list(graph.nodes):
        if not _is_tensor_add(node):
            continue
        if node.kwargs:
            raise ValueError(f"harmonize: add '{node.name}' in '{node.meta.get('labkit_scope') or 'the root'}' "
                             f"has keyword arguments {dict(node.kwargs)} (e.g. alpha): an integer adder "
                             "cannot express them; write a plain 'a + b'")
        scope = node.meta.get("labkit_scope", "")
        plans.append({"kind": "integer_add", "name": new_name(_join(scope, "integer_add")), "node": node})

    # passes 2 and 3: unquantized tensors reaching quantized convs/linears
    fixes: dict[fx.Node, dict] = {}
    for node in graph.nodes:
        if not isinstance(target_of(node), QUANT_LINEAR) or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and _is_passthrough(src, modules):
            src = src.args[0]
        if not isinstance(src, fx.Node) or src.op in ("placeholder", "get_attr"):
            continue
        producer = target_of(src)
        if isinstance(producer, QUANTIZERS) or any(p["node"] is src for p in plans):
            continue
        if src in fixes:
            continue
        if isinstance(producer, PRODUCERS):
            outer = tracer.module_outputs.get(src, [])
            name = _join(outer[-1], "output_act") if outer else f"{src.target}_act"
            fixes[src] = {"kind": "output_act", "name": new_name(name), "node": src}
        elif _is_pool(src, modules):
            if requant_pool:
                base = f"{src.target}_act" if src.op == "call_module" else \
                    _join(src.meta.get("labkit_scope", ""), "pool_act")
                unsigned = _comes_from_unsigned(src.args[0], modules)
                fixes[src] = {"kind": "pool_act", "name": new_name(base), "node": src, "unsigned": unsigned}
        else:
            what = f"{src.target} ({type(producer).__name__})" if producer is not None else f"'{src.name}'"
            warnings.warn(f"harmonize: {what} feeds the quantized layer '{node.target}' with no quantizer "
                          "in between, so that layer's input is not on an integer grid; quantize it too "
                          "(e.g. add it to PACTUnsignedAct in network.quantize)", stacklevel=2)
    plans.extend(fixes.values())

    # per-insertion kwargs (defaults, then `layers` overrides), modules built before the graph changes
    overrides = _match_overrides(layers, [p["name"] for p in plans])
    device = next((p.device for p in net.parameters()), None)
    for plan in plans:
        kwargs = {**act_kwargs, **overrides.get(plan["name"], {})}
        plan["kwargs"] = kwargs
        plan["module"] = _build(plan, kwargs, force_out_eps)
        plan["module"].train(net.training)
        if device is not None:
            plan["module"].to(device)

    for plan in plans:
        gm.add_submodule(plan["name"], plan["module"])
        node = plan["node"]
        if plan["kind"] == "integer_add":
            with graph.inserting_before(node):
                new = graph.call_module(plan["name"], args=tuple(node.args))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        else:
            with graph.inserting_after(node):
                new = graph.call_module(plan["name"], args=(node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        new.meta["labkit_scope"] = node.meta.get("labkit_scope", "")
    graph.lint()
    gm.recompile()

    inserted = list(previous.get("inserted", [])) + [
        {"name": p["name"], "type": type(p["module"]).__name__, "role": p["kind"], "kwargs": dict(p["kwargs"])}
        for p in plans]
    gm.meta[META_KEY] = {"inserted": inserted,
                         "options": {"requant_pool": requant_pool, "force_out_eps": force_out_eps,
                                     "layers": layers, **act_kwargs}}
    _keep_plain_attributes(net, gm)
    return gm


def harmonized_layers(net: nn.Module) -> list[dict]:
    """What :func:`harmonize` inserted into ``net`` (name, type, role, kwargs); ``[]`` if nothing/not harmonized."""
    meta = getattr(net, "meta", None)
    return [dict(d) for d in (meta or {}).get(META_KEY, {}).get("inserted", [])]


# ---------------------------------------------------------------------------------------------------------
def _join(scope: str, leaf: str) -> str:
    return f"{scope}.{leaf}" if scope else leaf


def _is_tensor_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or \
             (node.op == "call_method" and node.target in ADD_METHODS)
    return is_add and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), PASS_MODULES)
    if node.op == "call_function":
        return node.target in PASS_FUNCTIONS
    return node.op == "call_method" and node.target in PASS_METHODS


def _is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), POOL_MODULES)
    return node.op == "call_function" and node.target in POOL_FUNCTIONS


def _comes_from_unsigned(node: Any, modules: dict[str, nn.Module]) -> bool:
    while isinstance(node, fx.Node) and _is_passthrough(node, modules):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "call_module" and \
        isinstance(modules.get(node.target), PACTUnsignedAct)


def _match_overrides(layers: dict[str, dict | None], names: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    claimed: dict[str, str] = {}
    for regex, kwargs in layers.items():
        try:
            pattern = re.compile(regex)
        except re.error as err:
            raise ValueError(f"harmonize.layers: {regex!r} is not a valid regular expression ({err})") from err
        hits = [n for n in names if pattern.match(n)]
        if not hits:
            raise ValueError(f"harmonize.layers: regex {regex!r} matches no inserted module; the harmonizer "
                             f"inserts: {', '.join(names) or 'nothing'}. Fix or remove the key")
        for name in hits:
            if name in claimed:
                raise ValueError(f"harmonize.layers: inserted module '{name}' is matched by both "
                                 f"{claimed[name]!r} and {regex!r}; make the regexes disjoint (anchor with '$')")
            claimed[name] = regex
            out[name] = dict(kwargs or {})
    return out


def _build(plan: dict, kwargs: dict, force_out_eps: bool) -> nn.Module:
    kind, name = plan["kind"], plan["name"]
    n_levels = kwargs.get("n_levels", 256)
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"harmonize: n_levels for '{name}' must be an integer >= 2, got {n_levels!r}; "
                         "fix network.quantize.harmonize (or its 'layers' entry)")
    try:
        if kind == "integer_add":
            add_kwargs = {"force_out_eps": force_out_eps, **kwargs}
            return PACTIntegerAdd(num_args=2, signed=True, **add_kwargs)
        if kind == "pool_act" and plan.get("unsigned"):
            act = {k: v for k, v in kwargs.items() if k not in ("symm",)}
            act.setdefault("act_kind", "relu")
            return PACTUnsignedAct(**act)
        return PACTAsymmetricAct(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"harmonize: cannot build {kind} '{name}' with {kwargs}: {err}. Fix "
                        "network.quantize.harmonize (or its 'layers' entry)") from err


def _keep_plain_attributes(net: nn.Module, gm: fx.GraphModule) -> None:
    """Copy the root's public scalar attributes (``num_classes``, ``capacity``...) so they survive on ``gm``."""
    keep = {k: v for k, v in vars(net).items()
            if not k.startswith("_") and k not in ("training", "meta") and isinstance(v, (bool, int, float, str))
            and not (isinstance(v, float) and math.isnan(v))}
    keep.update(getattr(net, "meta", {}).get(_USER_PRESERVED_ATTRIBUTES_KEY, {}) if isinstance(net, fx.GraphModule) else {})
    for key, value in keep.items():
        if not hasattr(gm, key):
            setattr(gm, key, value)
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = keep
