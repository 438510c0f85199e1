"""Conv and linear layers whose weights are fake-quantized after ``start`` (settings: role ``weights``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from labkit.config.spec import QuantSpec
from labkit.quant import init as qinit
from labkit.quant.base import QuantizerBase


class _WeightQuantizer(QuantizerBase):
    """Weight fake quantization for conv/linear subclasses (``self.weight``); float weights before start.

    Always signed. ``symm`` (``symm_wts`` in configs): almost-symmetric range (m = ``clip_hi``); else lo/hi
    free. ``per_channel``: one bound per output channel (dim 0), bound gradients reduced per channel.

    Bounds that are not learned follow the weights: while started, not frozen and ``learn_clip`` false,
    :meth:`refresh_bounds` re-applies the ``init_clip`` rule to the current weights; the linear controller
    calls it before every training batch and before validation, as the reference does. The stored bounds are
    always the ones the last forward used, derived from the weights it used (checkpoints, a resumed run and
    the integer twin see exactly those); ``freeze`` keeps the last ones."""

    def _setup_weight_quant(self, spec: QuantSpec | None, settings: dict) -> None:
        if spec is None:
            spec = QuantSpec.for_role("weights", **settings)
        elif settings:
            spec = spec.replace(**settings)
        if spec.role != "weights":
            raise ValueError(f"{type(self).__name__} needs a 'weights' spec, got role '{spec.role}'")
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1) if spec.per_channel else ()
        self._setup_quantizer(spec, shape)
        self.to(self.weight.device)

    quantize = property(lambda self: self.spec.quantize)
    per_channel = property(lambda self: self.spec.per_channel)
    symm_wts = property(lambda self: self.spec.symm)

    def _raw_init_bounds(self):
        return qinit.weight_clip(self.weight, self.init_clip, self.n_levels, self.per_channel, self.nb_std,
                                 self.init_clip_lo, self.init_clip_hi)

    @property
    def follows_weights(self) -> bool:
        """Whether :meth:`refresh_bounds` re-derives the bounds: started, not frozen, not learned, not
        ``const``."""
        return self._started and not self._frozen and not self.learn_clip and self.init_clip != "const"

    def refresh_bounds(self) -> bool:
        """Re-derive the bounds from the current weights by ``init_clip`` if :attr:`follows_weights`; returns
        whether it did (:func:`refresh_weight_bounds`)."""
        return refresh_weight_bounds([self]) == 1

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward: fake-quantized after ``start``, float before."""
        return self.fake_quant(self.weight) if self._started else self.weight

    @torch.no_grad()
    def _copy_from(self, module: nn.Module):
        """Take ``module``'s weight, bias and train/eval mode (for ``from_float``); returns self."""
        self.weight.copy_(module.weight)
        if module.bias is not None:
            self.bias.copy_(module.bias)
        return self.train(module.training)

    def get_eps_w(self) -> torch.Tensor:
        """Weight quantizer's eps, shape ``()`` or ``(C_out,)``."""
        return self.get_eps()

    def get_clip_w(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight quantizer's effective (lo, hi), shape ``()`` or ``(C_out,)``."""
        return self.get_clip()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self._quant_repr()}, quantize={self.quantize!r}, "
                f"symm_wts={self.symm}, started={self._started}, frozen={self._frozen}")


class PACTConv2d(nn.Conv2d, _WeightQuantizer):
    """``nn.Conv2d`` whose weights are fake-quantized after ``start``; quantizer settings as ``spec=`` or
    keyword arguments (:class:`QuantSpec`, role ``weights``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
                 spec: QuantSpec | None = None,
                 device=None, dtype=None, **settings):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_weight_quant(spec, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: QuantSpec | None = None, **settings) -> PACTConv2d:
        """A PACTConv2d with ``module``'s geometry, weights and bias (copied)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"PACTConv2d.from_float needs an nn.Conv2d, got {type(module).__name__}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, spec=spec,
                  device=module.weight.device, dtype=module.weight.dtype, **settings)
        return new._copy_from(module)


class PACTLinear(nn.Linear, _WeightQuantizer):
    """``nn.Linear`` whose weights are fake-quantized after ``start``; settings as for :class:`PACTConv2d`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 spec: QuantSpec | None = None,
                 device=None, dtype=None, **settings):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_weight_quant(spec, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Linear, spec: QuantSpec | None = None, **settings) -> PACTLinear:
        """A PACTLinear with ``module``'s shape, weights and bias (copied)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"PACTLinear.from_float needs an nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, module.bias is not None, spec=spec,
                  device=module.weight.device, dtype=module.weight.dtype, **settings)
        return new._copy_from(module)


@torch.no_grad()
def refresh_weight_bounds(quantizers: list[_WeightQuantizer]) -> int:
    """Re-derive by ``init_clip`` the bounds of the quantizers that follow their weights (the TQT gradient
    normalisation's state is kept); returns how many. A symmetric grid needs only the magnitude m of a rule
    (``max``: max |w|, SAWB): those are stored together, one foreach op per step per kind of grid."""
    batches: dict[tuple, list] = {}
    done = 0
    for q in quantizers:
        if not q.follows_weights:
            continue
        done += 1
        if q.grid.symmetric and q.init_clip in qinit.MAGNITUDE_MODES:
            batches.setdefault((type(q.grid), q.n_levels), []).append(q)
        else:
            q.grid.store(q, *q._raw_init_bounds(), keep_state=True)
    for qs in batches.values():
        ms = [qinit.weight_magnitude(q.weight, q.init_clip, q.n_levels, q.per_channel) for q in qs]
        qs[0].grid.store_magnitudes(qs, ms)
    return done
