"""Export of an integer network (:func:`labkit.integer.integerize`) as ONNX plus golden data, for three targets.

``graph`` (the walk every export shares), ``standard`` (standard operators, exact in onnxruntime; also the qonnx
target), ``deeploy`` (RequantShift nodes of the int32 twin for Deeploy's Generic platform), ``folder``
(:func:`export` writes a folder, :func:`check_export` runs it with onnxruntime). docs/export.md says which
tools were run on each target and how.
"""

from labkit.export.deeploy import as_standard
from labkit.export.folder import TARGETS, check_export, export, to_onnx
from labkit.export.graph import CUSTOM_DOMAIN, OPSET, ExportError, finn_type

__all__ = ["CUSTOM_DOMAIN", "ExportError", "OPSET", "TARGETS", "as_standard", "check_export", "export", "finn_type",
           "to_onnx"]
