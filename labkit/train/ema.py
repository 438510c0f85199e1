"""An exponential moving average (EMA) of the weights: the network a run validates, checkpoints and deploys.

From the start of epoch ``start_epoch`` (where the average is reset to the current weights), after every
optimizer step ``avg <- decay * avg + (1 - decay) * w`` for every parameter named ``weight`` or ``bias``
(convolutions, linear layers, batch norms). Quantizer parameters (PACT clips, TQT ``log2 t``) and buffers
(batch-norm statistics, quantizer state) are the trained network's. The averaged network is a copy of the
trained one with the averages loaded and its quantizers synchronised as before any forward pass (weight bounds
that follow the weights re-derived, adders' eps shared), so it integerizes like any trained network. With
``decay`` d the average spans about ``1 / (1 - d)`` optimizer steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from labkit.quant.controllers import sync_quantizers

__all__ = ["WeightEMA", "AVERAGED"]

#: the parameters (by attribute name) that are averaged
AVERAGED = ("weight", "bias")


class WeightEMA:
    """The moving average of ``net``'s weights (``decay`` per optimizer step, reset at ``start_epoch``)."""

    def __init__(self, net: nn.Module, decay: float, start_epoch: int = 0):
        self.decay, self.start_epoch = float(decay), int(start_epoch)
        self.names = [n for n, _ in net.named_parameters() if n.rsplit(".", 1)[-1] in AVERAGED]
        # views of the parameters' storage: the optimizer updates it in place, so they stay current
        self.weights = [net.get_parameter(n).detach() for n in self.names]
        self.averages = [w.clone() for w in self.weights]
        self.active = False

    def begin_epoch(self, epoch: int) -> None:
        """Averaging runs from ``start_epoch`` on; at ``start_epoch`` it starts from the current weights."""
        if epoch == self.start_epoch:
            torch._foreach_copy_(self.averages, self.weights)
        self.active = epoch >= self.start_epoch

    @torch.no_grad()
    def update(self) -> None:
        """``avg <- avg + (1 - decay) * (w - avg)`` after an optimizer step (none before ``start_epoch``)."""
        if self.active:
            torch._foreach_lerp_(self.averages, self.weights, 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self, net: nn.Module) -> nn.Module:
        """A copy of ``net`` (the network the average was built on) holding the averages, quantizers
        synchronised."""
        twin = copy.deepcopy(net)
        for name, average in zip(self.names, self.averages):
            twin.get_parameter(name).copy_(average)
        sync_quantizers(twin)
        return twin

    @torch.no_grad()
    def load_averages(self, state_dict: dict) -> None:
        """The averages from the ``state_dict`` of an averaged network (a checkpoint's: resuming goes on
        averaging where the run stopped)."""
        for name, average in zip(self.names, self.averages):
            average.copy_(state_dict[name])
