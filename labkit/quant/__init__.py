"""Stage 3, quant: fake-quant kernels, PACT and TQT quantizers, init, controllers, recipe, harmonizer."""

from labkit.config.spec import ACT_KINDS, MAX_LEVELS, MIN_LEVELS, QUANTIZE_MODES, QuantSpec, SpecError
from labkit.quant.acts import PACTAsymmetricAct, PACTIntegerAdd, PACTUnsignedAct
from labkit.quant.base import QuantizerBase, quant_summaries, quantizers
from labkit.quant.controllers import COMMANDS, PACTController, get_pact_controllers, parse_schedule
from labkit.quant.functional import EPS_MIN, pact_quantize, tqt_quantize, tqt_scale
from labkit.quant.init import ACT_INIT_MODES, SAWB_COEFFS, WEIGHT_INIT_MODES, sawb_clip, sawb_coefficients
from labkit.quant.layers import PACTConv2d, PACTLinear
from labkit.quant.optimizers import PACTSGD, PACTAdam, normalize_tqt_grads, split_parameters, tqt_modules

__all__ = [
    "ACT_INIT_MODES", "ACT_KINDS", "COMMANDS", "EPS_MIN", "MAX_LEVELS", "MIN_LEVELS", "QUANTIZE_MODES",
    "SAWB_COEFFS",
    "WEIGHT_INIT_MODES", "PACTAdam", "PACTAsymmetricAct", "PACTController", "PACTConv2d", "PACTIntegerAdd",
    "PACTLinear", "PACTSGD", "PACTUnsignedAct", "QuantSpec", "QuantizerBase", "SpecError",
    "get_pact_controllers",
    "normalize_tqt_grads", "pact_quantize", "parse_schedule", "quant_summaries", "quantizers", "sawb_clip",
    "sawb_coefficients", "split_parameters", "tqt_modules", "tqt_quantize", "tqt_scale",
]
