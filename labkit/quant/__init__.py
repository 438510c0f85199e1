"""Fake quantization: PACT/SAWB and TQT layers, init rules, controllers, optimizers."""

from labkit.quant.controllers import COMMANDS, PACTController, get_pact_controllers, parse_schedule
from labkit.quant.functional import EPS_MIN, pact_quantize, tqt_quantize, tqt_scale
from labkit.quant.init import ACT_INIT_MODES, SAWB_COEFFS, WEIGHT_INIT_MODES, sawb_clip, sawb_coefficients
from labkit.quant.modules import (
    ACT_KINDS,
    QUANTIZE_MODES,
    PACTAsymmetricAct,
    PACTConv2d,
    PACTIntegerAdd,
    PACTLinear,
    PACTUnsignedAct,
    QuantizerBase,
    quant_summaries,
    quantizers,
)
from labkit.quant.optim import PACTAdam, PACTSGD, split_parameters

__all__ = [
    "ACT_INIT_MODES", "ACT_KINDS", "COMMANDS", "EPS_MIN", "QUANTIZE_MODES", "SAWB_COEFFS", "WEIGHT_INIT_MODES",
    "PACTAdam", "PACTAsymmetricAct", "PACTController", "PACTConv2d", "PACTIntegerAdd", "PACTLinear", "PACTSGD",
    "PACTUnsignedAct", "QuantizerBase", "get_pact_controllers", "pact_quantize", "parse_schedule",
    "quant_summaries", "quantizers", "sawb_clip", "sawb_coefficients", "split_parameters", "tqt_quantize",
    "tqt_scale",
]
