"""An export folder: ``network.onnx`` of one target plus golden data, and its check with onnxruntime.

* ``network.onnx``: ``target`` ``onnx`` (standard operators, symbolic batch ``N``), ``qonnx`` (the same with
  the batch fixed to the exported samples and a shape on every tensor, as qonnx's ``execute_onnx`` needs) or
  ``deeploy`` (RequantShift nodes of the int32 twin, as Deeploy's Generic platform reads them) or
  ``deeploy-cmsis`` (the CMSIS twin, :func:`labkit.integer.cmsis_requant.cmsis_twin`, in the graph Deeploy's
  CMSIS platform maps: :mod:`labkit.export.cmsis_graph`).
* ``inputs.npz`` (``input``: the codes fed to the network, float32), ``outputs.npz`` (``output``: the int64
  logits of the network exported) and, with ``activations=True``, ``activations.npz``: the output of every
  integer layer keyed by module name, in the smallest integer dtype that holds it (uint8/int8 codes, int32
  accumulators).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

from labkit.export.cmsis_graph import for_cmsis
from labkit.export.deeploy import DeeployWriter, as_standard
from labkit.export.graph import CUSTOM_DOMAIN, ExportError
from labkit.export.standard import StandardWriter
from labkit.integer import integer_layers

TARGETS = ("onnx", "qonnx", "deeploy", "deeploy-cmsis")


def to_onnx(inet: fx.GraphModule, path: str | Path | None = None, *, target: str = "onnx",
            batch: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``inet`` for ``target`` (module docstring); ``batch``: the static batch of the qonnx
    and deeploy targets (default 1). Written to ``path`` when given."""
    if target not in TARGETS:
        raise ExportError(f"export: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target.startswith("deeploy"):
        model = DeeployWriter(inet, batch or 1, target).build()
        if target == "deeploy-cmsis":
            model = for_cmsis(model)
    else:
        model = StandardWriter(inet, batch or 1 if target == "qonnx" else None).build(
            static_batch=target == "qonnx"
        )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(model.SerializeToString())
    return model


@torch.no_grad()
def export(inet: fx.GraphModule, out_dir: str | Path, inputs: torch.Tensor, *, target: str = "onnx",
           activations: bool = False, batch: int | None = None) -> dict[str, Path]:
    """Write ``network.onnx``, ``inputs.npz``, ``outputs.npz`` (and ``activations.npz``) into ``out_dir``.

    ``inputs``: a float batch of normalised images (quantized here by ``inet.input_quant``); the qonnx and
    deeploy targets fix the network's batch to ``batch`` (default: all the inputs; it must divide their
    number: the golden data then holds several runs of the network). Returns the paths.
    """
    if batch is not None and (batch < 1 or len(inputs) % batch):
        raise ExportError(f"export: the batch ({batch}) must divide the number of inputs ({len(inputs)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"network": out / "network.onnx", "inputs": out / "inputs.npz", "outputs": out / "outputs.npz"}
    to_onnx(inet, paths["network"], target=target, batch=batch or len(inputs))
    captured: dict[str, np.ndarray] = {}
    hooks = []
    if activations:
        for name, m in integer_layers(inet):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, y, name=name: captured.__setitem__(name, _compact(y))))
    try:
        codes = inet.input_quant(inputs)
        logits = inet(inputs)
    finally:
        for hk in hooks:
            hk.remove()
    np.savez(paths["inputs"], input=codes.cpu().numpy().astype(np.float32))
    np.savez(paths["outputs"], output=logits.cpu().numpy().astype(np.int64))
    if activations:
        paths["activations"] = out / "activations.npz"
        np.savez(paths["activations"], **captured)
    return paths


def _compact(t: torch.Tensor) -> np.ndarray:
    """The smallest integer dtype that holds ``t`` (int8/uint8 codes, int32 accumulators)."""
    a = t.detach().cpu().numpy()
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dt in (np.uint8, np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a.astype(np.int64)


def check_export(out_dir: str | Path) -> dict:
    """Run ``network.onnx`` with onnxruntime on ``inputs.npz`` and compare with ``outputs.npz`` (must be
    equal).

    A Deeploy export runs as :func:`labkit.export.deeploy.as_standard` rewrites it (RequantShift in standard
    operators, Deeploy's semantics)."""
    out = Path(out_dir)
    model = onnx.load(str(out / "network.onnx"))
    deeploy = any(n.domain == CUSTOM_DOMAIN for n in model.graph.node)
    if not deeploy:
        onnx.checker.check_model(model, full_check=True)
    runnable = as_standard(model) if deeploy else model
    onnx.checker.check_model(runnable, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(runnable.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with np.load(out / "inputs.npz") as f:
        x = f["input"]
    with np.load(out / "outputs.npz") as f:
        expected = f["output"]
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = dim.dim_value if dim.HasField("dim_value") and dim.dim_value else len(x)  # a static batch: in runs
    got = np.concatenate([session.run(["output"], {"input": x[i:i + step]})[0] for i in range(0, len(x),
                                                                                              step)])
    # deeploy: float64 logits
    exact = np.array_equal(got, expected) and (deeploy or got.dtype == expected.dtype)
    diff = int(np.abs(got.astype(np.int64) - expected).max()) if expected.size else 0
    return {"samples": int(x.shape[0]), "exact": bool(exact),
            "max_abs_diff": diff, "onnx_nodes": len(model.graph.node),
            "ops": sorted({n.op_type for n in model.graph.node}), "target": _target(model)}


def _target(model: onnx.ModelProto) -> str:
    return next((p.value for p in model.metadata_props if p.key == "target"), "onnx")
