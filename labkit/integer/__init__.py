"""Stage 6, integer: a harmonized fake-quant network -> its integer twin (int64 exact, int32), checked."""

from labkit.integer.cmsis_requant import CmsisPlan, CmsisRequant, cmsis_requant, cmsis_twin
from labkit.integer.compare import Comparison, compare
from labkit.integer.grid import input_eps, input_range, input_shape_of
from labkit.integer.int32 import (
    INT32_MAX,
    Int32Plan,
    Int32Requant,
    PreClip,
    input_intervals,
    int32_requant,
    int32_twin,
)
from labkit.integer.integerize import integerize
from labkit.integer.modules import (
                                    IntAdd,
                                    IntConv2d,
                                    IntegerizeError,
                                    IntLinear,
                                    IntSumPool,
                                    QuantizeInput,
                                    Requant,
                                    integer_layers,
                                    requant_layers,
)
from labkit.config.spec import D_MAX, EXACT_BITS
from labkit.integer.requant import requant_params

__all__ = ["CmsisPlan", "CmsisRequant", "Comparison", "cmsis_requant", "cmsis_twin",
           "D_MAX", "EXACT_BITS", "INT32_MAX", "Int32Plan", "Int32Requant", "IntAdd", "PreClip",
           "IntConv2d",
           "IntLinear", "IntSumPool", "IntegerizeError", "QuantizeInput", "Requant", "compare", "input_eps",
           "input_intervals", "input_range", "input_shape_of", "int32_requant", "int32_twin",
           "integer_layers", "integerize",
           "requant_layers", "requant_params"]
