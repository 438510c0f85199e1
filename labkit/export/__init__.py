"""Stage 7, export: an integer network as ONNX (onnxruntime, qonnx, Deeploy) with golden data."""

from labkit.export.deeploy import as_standard
from labkit.export.folder import TARGETS, check_export, export, to_onnx
from labkit.export.graph import CUSTOM_DOMAIN, OPSET, ExportError, finn_type

__all__ = ["CUSTOM_DOMAIN", "ExportError", "OPSET", "TARGETS", "as_standard", "check_export", "export",
           "finn_type",
           "to_onnx"]
