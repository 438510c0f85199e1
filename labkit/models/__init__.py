"""Network topologies, named as the reference framework names them (configs key on these names)."""

from labkit.models.mobilenetv2 import STRIDE_TABLES, InvertedResidual, MobileNetV2, make_divisible

__all__ = ["MobileNetV2", "InvertedResidual", "STRIDE_TABLES", "make_divisible"]
