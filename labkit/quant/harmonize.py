"""Harmonization: make a fake-quantized network integerizable (a torch.fx pass).

After :func:`labkit.quant.recipe.pact_recipe` has swapped convs, linears and ReLUs for their PACT
counterparts, three kinds of tensors are still not on an integer grid. :func:`harmonize` traces the network
and fixes them:

1. **Residual adds.** Every ``a + b`` (``operator.add``, ``torch.add``, ``Tensor.add``) between two tensors
   becomes a :class:`~labkit.quant.PACTIntegerAdd` submodule: one quantizer per input and one on the output,
   the inputs sharing one eps so their integer codes can be added. Named ``<scope>.integer_add`` after the
   module whose ``forward`` did the add (``features.2.integer_add`` in MobileNetV2).
2. **Linear op into linear op.** Where the output of a conv, batch norm or linear layer reaches a quantized
   conv/linear (:class:`~labkit.quant.PACTConv2d`, :class:`~labkit.quant.PACTLinear`) with no quantizer in
   between (only shape ops such as flatten/dropout), a signed :class:`~labkit.quant.PACTAsymmetricAct` is
   inserted right after the producer, and *every* user of the producer reads the quantized tensor (so the
   skip connection of the next block carries the same codes as its first conv). Named ``<module>.output_act``
   after the outermost module whose output that tensor is (``features.0.output_act``: after the projection BN
   of a block without skip), else ``<producer>_act``. In MobileNetV2: blocks 0, 1, 3, 6, 10, 13, 16 -> 7
   insertions.
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
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from labkit.quant import PACTAsymmetricAct, PACTIntegerAdd, PACTUnsignedAct, QuantSpec
from labkit.quant.fxops import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    FLOAT_ACTS,
    FLOAT_LINEAR,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    PRODUCERS,
    QUANT_LINEAR,
    QUANTIZERS,
    QuantTracer,
)

__all__ = ["harmonize", "plan", "HarmonizePlan", "QuantTracer", "harmonized_layers", "META_KEY", "ROLES"]

#: ``GraphModule.meta`` key under which :func:`harmonize` records what it inserted (survives deepcopy).
META_KEY = "labkit_harmonize"
#: roles of inserted modules: residual adds, signed requantizers after linear ops, the pool requantizer
ROLES = ("integer_add", "output_act", "pool_act")

@dataclass
class HarmonizePlan:
    """What :func:`harmonize` inserts into a network, and how quantizers and quantized layers connect.

    ``insertions``: one dict per module to insert, in graph order: ``name``, ``role`` (:data:`ROLES`) and
    ``unsigned`` (a pool requantizer fed by an unsigned activation). ``links``: for every quantized
    conv/linear, ``{"input": q, "output": q}``, the names of the quantizers whose codes it reads and of
    the one that requantizes its output (an existing activation quantizer or an inserted module; ``input``
    is ``"input"`` for the network input, ``output`` ``None`` for the network output). ``follows``: for each
    quantizer that requantizes another quantizer's codes (the pool requantizer averages the last
    activation's codes), that quantizer. ``gm``: the traced network (``nodes`` maps names to its nodes).
    """

    insertions: list[dict] = field(default_factory=list)
    links: dict[str, dict] = field(default_factory=dict)
    follows: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict, repr=False)
    gm: Any = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return [i["name"] for i in self.insertions]


def plan(net: nn.Module, quantized: Iterable[str] | None = None, *, requant_pool: bool = True,
         leaf_types: Iterable[type] = ()) -> HarmonizePlan:
    """What :func:`harmonize` would insert into ``net`` (not modified) and the quantizer links.

    ``quantized``: names of the float convs, linears and ReLU/ReLU6 of ``net`` that the recipe will quantize
    (``None``: only the modules that already are PACT modules count as quantized).
    """
    _check_options(requant_pool, False, {})
    tracer, graph, gm = _trace(net, leaf_types)
    found = _analyse(graph, dict(gm.named_modules()), tracer, set(quantized or ()), requant_pool, warn=False)
    found.gm = gm
    return found


def harmonize(net: nn.Module, *, requant_pool: bool = True, force_out_eps: bool = False,
              layers: dict[str, dict] | None = None, leaf_types: Iterable[type] = (),
              **act_kwargs: Any) -> fx.GraphModule:
    """Trace ``net`` and insert integer adders, signed activations and the pool requantizer (module doc).

    ``act_kwargs`` (``n_levels``, ``init_clip``, ``learn_clip``, ``symm``, ``rounding``, ``tqt``, ...: the
    settings of :class:`~labkit.quant.QuantSpec`) go to every inserted quantizer: the
    :class:`PACTAsymmetricAct` s, the adders' quantizers (``PACTIntegerAdd(num_args=2, signed=True,
    force_out_eps=force_out_eps, ...)``) and the pool requantizer (``symm`` is dropped for an unsigned one).
    ``layers`` maps regexes on the *inserted* names (``re.match``, e.g. ``"avgpool_act$"``) to settings
    overriding those defaults for the modules they match (mixed precision). ``leaf_types``: extra module
    classes not to trace into.

    Returns a new :class:`torch.fx.GraphModule` sharing the (already quantized) submodules of ``net``; what
    was inserted is listed in ``gm.meta[META_KEY]["inserted"]`` (see :func:`harmonized_layers`).
    """
    layers = dict(layers or {})
    _check_options(requant_pool, force_out_eps, layers)
    tracer, graph, gm = _trace(net, leaf_types)
    original = dict(net.named_modules())
    for name, module in gm.named_modules():  # fx's stand-in containers start in training mode
        if name in original:
            module.training = original[name].training
    found = _analyse(graph, dict(gm.named_modules()), tracer, set(), requant_pool, warn=True)
    # per-insertion settings (defaults, then `layers` overrides), modules built before the graph changes
    overrides = _match_overrides(layers, found.names)
    device = next((p.device for p in net.parameters()), None)
    built = []
    for item in found.insertions:
        kwargs = {**act_kwargs, **overrides.get(item["name"], {})}
        module = _build(item, kwargs, force_out_eps).train(net.training)
        built.append((item, kwargs, module if device is None else module.to(device)))
    _insert(gm, graph, found, built)
    previous = getattr(net, "meta", {}).get(META_KEY, {}) if isinstance(net, fx.GraphModule) else {}
    inserted = list(previous.get("inserted", [])) + [
        {"name": item["name"], "type": type(module).__name__, "role": item["role"], "kwargs": dict(kwargs)}
        for item, kwargs, module in built]
    gm.meta[META_KEY] = {"inserted": inserted,
                         "options": {"requant_pool": requant_pool, "force_out_eps": force_out_eps,
                                     "layers": layers, **act_kwargs}}
    _keep_plain_attributes(net, gm)
    return gm


def _insert(gm: fx.GraphModule, graph: fx.Graph, found: HarmonizePlan, built: list) -> None:
    """Add the built modules to ``gm`` and rewire the graph: an adder replaces its add, a quantizer follows
    the tensor it quantizes."""
    for item, _, module in built:
        gm.add_submodule(item["name"], module)
        node = found.nodes[item["name"]]
        if item["role"] == "integer_add":
            with graph.inserting_before(node):
                new = graph.call_module(item["name"], args=tuple(node.args))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        else:
            with graph.inserting_after(node):
                new = graph.call_module(item["name"], args=(node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        new.meta["labkit_scope"] = node.meta.get("labkit_scope", "")
    graph.lint()
    gm.recompile()


def harmonized_layers(net: nn.Module) -> list[dict]:
    """What :func:`harmonize` inserted into ``net`` (name, type, role, kwargs); ``[]`` if nothing/not
    harmonized."""
    meta = getattr(net, "meta", None)
    return [dict(d) for d in (meta or {}).get(META_KEY, {}).get("inserted", [])]


# --------------------------------------------------------------------------------------------------- analysis
def _trace(net: nn.Module, leaf_types: Iterable[type]) -> tuple[QuantTracer, fx.Graph, fx.GraphModule]:
    tracer = QuantTracer(leaf_types)
    try:
        graph = tracer.trace(net)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"harmonize: torch.fx could not trace {type(net).__name__}: {err}. Data-dependent "
                           "control flow must live inside leaf modules; pass their classes as leaf_types"
                           ) from err
    return tracer, graph, fx.GraphModule(tracer.root, graph, class_name=type(net).__name__)


def _analyse(graph: fx.Graph, modules: dict[str, nn.Module], tracer: QuantTracer, will_quantize: set[str],
             requant_pool: bool, warn: bool) -> HarmonizePlan:
    """Find the insertions (adds, unquantized tensors reaching quantized layers, pools) and the links."""
    a = _Analysis(graph, modules, tracer, will_quantize)
    a.adds()
    a.unquantized_inputs(requant_pool, warn)
    order = {n: i for i, n in enumerate(graph.nodes)}
    a.found.insertions.sort(key=lambda item: order[a.found.nodes[item["name"]]])
    a.links()
    return a.found


class _Analysis:
    """One pass of :func:`_analyse` over a traced graph: where quantizers go and which quantizer feeds
    what."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], tracer: QuantTracer,
                 will_quantize: set):
        self.graph, self.modules, self.tracer, self.will_quantize = graph, modules, tracer, will_quantize
        self.taken = set(modules)
        self.found = HarmonizePlan()
        self.at: dict[fx.Node, str] = {}  # graph node -> name of the module that quantizes it

    def module(self, node) -> nn.Module | None:
        return self.modules.get(node.target) if isinstance(node,
                                                           fx.Node) and node.op == "call_module" else None

    def is_qlinear(self, node) -> bool:
        m = self.module(node)
        return isinstance(m, QUANT_LINEAR) or (isinstance(m,
                                                          FLOAT_LINEAR) and node.target in self.will_quantize)

    def is_quantizer(self, node) -> bool:
        m = self.module(node)
        return isinstance(m, QUANTIZERS) or (isinstance(m, FLOAT_ACTS) and node.target in self.will_quantize)

    def insert(self, node: fx.Node, role: str, base: str, **extra) -> None:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        self.found.insertions.append({"name": name, "role": role, **extra})
        self.found.nodes[name] = node
        self.at[node] = name

    def adds(self) -> None:
        """Residual adds -> PACTIntegerAdd."""
        for node in self.graph.nodes:
            if _is_tensor_add(node):
                if node.kwargs:
                    raise ValueError(f"harmonize: add '{node.name}' in "
                                     f"'{node.meta.get('labkit_scope') or 'the root'}' has keyword arguments "
                                     f"{dict(node.kwargs)} (e.g. alpha): an integer adder cannot express "
                                     "them; write a plain 'a + b'")
                self.insert(node, "integer_add", _join(node.meta.get("labkit_scope", ""), "integer_add"))

    def unquantized_inputs(self, requant_pool: bool, warn: bool) -> None:
        """Unquantized tensors reaching quantized convs/linears: a signed activation after a conv/BN, the pool
        requantizer after a pool, a warning for anything else."""
        modules = self.modules
        for node in self.graph.nodes:
            if not self.is_qlinear(node) or not node.args:
                continue
            src = _skip_passthrough(node.args[0], modules)
            if not isinstance(src, fx.Node) or src.op in ("placeholder",
                                                          "get_attr") or self.is_quantizer(src) \
                    or src in self.at:
                continue
            producer = self.module(src)
            if isinstance(producer, PRODUCERS):
                outer = self.tracer.module_outputs.get(src, [])
                self.insert(src, "output_act", _join(outer[-1],
                                                     "output_act") if outer else f"{src.target}_act")
            elif _is_pool(src, modules):
                if requant_pool:
                    base = f"{src.target}_act" if src.op == "call_module" else \
                        _join(src.meta.get("labkit_scope", ""), "pool_act")
                    feeder = _skip_passthrough(src.args[0], modules)
                    self.insert(src, "pool_act", base, unsigned=_is_unsigned(feeder, modules,
                                                                             self.will_quantize))
                    self.found.follows[self.at[src]] = _quantizer_of(feeder, self.at, self.is_quantizer)
            elif warn:
                what = (
                    f"{src.target} ({type(producer).__name__})" if producer is not None else f"'{src.name}'"
                )
                warnings.warn(f"harmonize: {what} feeds the quantized layer '{node.target}' with no "
                              "quantizer in between, so that layer's input is not on an integer grid; "
                              "quantize it too (e.g. add it to PACTUnsignedAct in network.quantize)",
                              stacklevel=4)

    def links(self) -> None:
        """The quantizer each layer reads and the one that requantizes its output; what each quantizer
        follows."""
        at, is_quantizer = self.at, self.is_quantizer
        for node in self.graph.nodes:
            if self.is_qlinear(node) and node.args:
                src = _skip_passthrough(node.args[0], self.modules)
                self.found.links[node.target] = {"input": _quantizer_of(src, at, is_quantizer),
                                                 "output": _output_quantizer(node, self.modules, at,
                                                                             is_quantizer)}
            elif is_quantizer(node) and len(node.args) == 1 and not isinstance(self.module(node),
                                                                               PACTIntegerAdd):
                src = node.args[0]
                while isinstance(src, fx.Node) and (_is_passthrough(src, self.modules) or _is_pool(src,
                                                                                                   self.modules)):
                    src = src.args[0]
                if isinstance(src, fx.Node) and (is_quantizer(src) or src in at):
                    self.found.follows[node.target] = _quantizer_of(src, at, is_quantizer)


def _quantizer_of(node: Any, at: dict, is_quantizer: Callable) -> str | None:
    if not isinstance(node, fx.Node) or node.op == "placeholder":
        return "input"
    if node in at:
        return at[node]
    return node.target if is_quantizer(node) else None


def _output_quantizer(node: fx.Node, modules: dict, at: dict, is_quantizer: Callable) -> str | None:
    """Follow ``node``'s output through batch norms and shape ops to the first quantizer."""
    while True:
        if node in at:
            return at[node]
        users = list(node.users)
        if len(users) != 1 or users[0].op == "output":
            return None
        user = users[0]
        if is_quantizer(user) or user in at:
            return at.get(user) or user.target
        m = modules.get(user.target) if user.op == "call_module" else None
        if not (isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_passthrough(user, modules)):
            return None
        node = user


def _skip_passthrough(node: Any, modules: dict) -> Any:
    while isinstance(node, fx.Node) and _is_passthrough(node, modules):
        node = node.args[0]
    return node


def _check_options(requant_pool: Any, force_out_eps: Any, layers: dict) -> None:
    if not isinstance(requant_pool, bool):
        raise TypeError(f"harmonize: 'requant_pool' must be true or false, got {requant_pool!r}")
    if not isinstance(force_out_eps, bool):
        raise TypeError(f"harmonize: 'force_out_eps' must be true or false, got {force_out_eps!r}")
    if not all(isinstance(v, dict) or v is None for v in layers.values()):
        raise TypeError("harmonize: 'layers' must map regexes on inserted module names to settings dicts, "
                        'e.g. {"avgpool_act$": {"n_levels": 256}}')


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


def _is_unsigned(node: Any, modules: dict[str, nn.Module], will_quantize: set[str]) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    m = modules.get(node.target)
    return isinstance(m, PACTUnsignedAct) or (isinstance(m, FLOAT_ACTS) and node.target in will_quantize)


def _match_overrides(layers: dict[str, dict | None], names: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    claimed: dict[str, str] = {}
    for regex, kwargs in layers.items():
        try:
            pattern = re.compile(regex)
        except re.error as err:
            raise ValueError(
                f"harmonize.layers: {regex!r} is not a valid regular expression ({err})"
            ) from err
        hits = [n for n in names if pattern.match(n)]
        if not hits:
            raise ValueError(f"harmonize.layers: regex {regex!r} matches no inserted module; the harmonizer "
                             f"inserts: {', '.join(names) or 'nothing'}. Fix or remove the key")
        for name in hits:
            if name in claimed:
                raise ValueError(f"harmonize.layers: inserted module '{name}' is matched by both "
                                 f"{claimed[name]!r} and {regex!r}; make the regexes disjoint (anchor with "
                                 "'$')")
            claimed[name] = regex
            out[name] = dict(kwargs or {})
    return out


def _build(item: dict, kwargs: dict, force_out_eps: bool) -> nn.Module:
    role, name = item["role"], item["name"]
    try:
        if role == "integer_add":
            return PACTIntegerAdd(num_args=2, signed=True, force_out_eps=force_out_eps, **kwargs)
        if role == "pool_act" and item.get("unsigned"):
            act = {k: v for k, v in kwargs.items() if k not in ("symm",)}
            act.setdefault("act_kind", "relu")
            return PACTUnsignedAct(QuantSpec.for_role("unsigned_act", **act))
        return PACTAsymmetricAct(QuantSpec.for_role("signed_act", **kwargs))
    except (TypeError, ValueError) as err:
        raise type(err)(f"harmonize: cannot build {role} '{name}' with {kwargs}: {err}. Fix "
                        "network.quantize.harmonize (or its 'layers' entry)") from err


def _keep_plain_attributes(net: nn.Module, gm: fx.GraphModule) -> None:
    """Copy the root's public scalar attributes (``num_classes``, ``capacity``...) so they survive on
    ``gm``."""
    keep = {k: v for k, v in vars(net).items()
            if not k.startswith("_") and k not in ("training", "meta") and isinstance(v,
                                                                                      (bool, int, float, str))
            and not (isinstance(v, float) and math.isnan(v))}
    keep.update(
        getattr(net, "meta", {}).get(_USER_PRESERVED_ATTRIBUTES_KEY, {})
        if isinstance(net, fx.GraphModule)
        else {}
    )
    for key, value in keep.items():
        if not hasattr(gm, key):
            setattr(gm, key, value)
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = keep
