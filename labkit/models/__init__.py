"""Stage 2, models: MobileNetV2 with the reference framework's module names; torchvision conversion."""

from labkit.models.mobilenetv2 import STRIDE_TABLES, InvertedResidual, MobileNetV2, make_divisible

__all__ = ["MobileNetV2", "InvertedResidual", "STRIDE_TABLES", "make_divisible"]
