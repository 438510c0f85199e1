"""Copies of a labkit Deeploy export for Deeploy's test flows: a slice of its samples (a smaller static
batch), and a ``deeploy`` (Generic) export rewritten for Deeploy's CMSIS (Cortex-M) mapping by the package's
:func:`labkit.export.cmsis_graph.for_cmsis` (the flow ``cmsis-rewritten``: the Generic target's int32 twin in
the CMSIS graph, whose logits then follow CMSIS-NN's bias-first arithmetic, not ``outputs.npz``; the
``deeploy-cmsis`` target writes that graph with its own twin)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper as nh

from labkit.export.cmsis_graph import for_cmsis as cmsis_graph


def _set_batch(value, n: int) -> None:
    value.type.tensor_type.shape.dim[0].dim_value = n


def batch_of(export_dir: Path) -> int:
    with np.load(export_dir / "inputs.npz") as z:
        return int(z[z.files[0]].shape[0])


def samples(export_dir: Path, out_dir: Path, start: int, n: int) -> Path:
    """The export restricted to samples ``start .. start + n - 1``: every tensor's batch dimension set to
    ``n``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("inputs", "outputs"):
        with np.load(export_dir / f"{name}.npz") as z:
            np.savez(out_dir / f"{name}.npz", **{k: z[k][start : start + n] for k in z.files})
    model = onnx.load(str(export_dir / "network.onnx"))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        _set_batch(value, n)
    for init in model.graph.initializer:  # a Gemm's bias tiled to the batch by for_cmsis
        if init.name.endswith("_bias_tiled"):
            init.CopyFrom(nh.from_array(nh.to_array(init)[:n], init.name))
    onnx.save(model, str(out_dir / "network.onnx"))
    return out_dir


def for_cmsis(export_dir: Path, out_dir: Path) -> Path:
    """A copy of the export folder, its graph rewritten for Deeploy's CMSIS mapping (golden data as is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("inputs.npz", "outputs.npz"):
        shutil.copy(export_dir / name, out_dir / name)
    onnx.save(cmsis_graph(onnx.load(str(export_dir / "network.onnx"))), str(out_dir / "network.onnx"))
    return out_dir
