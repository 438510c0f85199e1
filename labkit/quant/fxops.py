"""What the torch.fx passes (harmonization, integerization) share: the tracer and the op tables.

:class:`QuantTracer` keeps quantized layers and quantizers as leaves and records module scopes; the tables
name the ops that keep values on their grid (shape ops, identities in evaluation), residual adds and pools.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct

QUANT_LINEAR = (PACTConv2d, PACTLinear)
QUANTIZERS = (PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)
FLOAT_LINEAR = (nn.Conv2d, nn.Linear)
FLOAT_ACTS = (nn.ReLU, nn.ReLU6)
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.adaptive_avg_pool1d, torch.avg_pool1d}
# shape ops (they keep values on their grid and compute nothing) and identities in evaluation
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
IDENTITY_MODULES = (nn.Dropout, nn.Identity)
PASS_MODULES = SHAPE_MODULES + IDENTITY_MODULES
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
PASS_FUNCTIONS = SHAPE_FUNCTIONS | {F.dropout}
PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}


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
