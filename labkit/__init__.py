"""labkit: a notebook lab for quantization-aware training of MobileNetV2."""

__version__ = "0.1.0"
