"""Checkpoint files: written atomically (temporary file + fsync + rename), read with ``weights_only=True``.

Temporary files are named ``.<name>.<random>.tmp`` beside the target (:data:`TMP_GLOB`); a writer killed
mid-write leaves one behind, which :func:`remove_stale_temps` clears. Written files get the usual
permissions (``0666 & ~umask``), not ``mkstemp``'s ``0600``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from labkit.config.errors import CheckpointError

FORMAT = "labkit-checkpoint"
TMP_GLOB = ".*.tmp"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see half a file."""
    return _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    return _write_atomic(path, lambda f: f.write(text.encode()))


def _write_atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder``; returns them."""
    stale = sorted(Path(folder).glob(TMP_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found: check the path (runs keep last.ckpt and "
                              "best.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of a truncated or foreign file
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a PyTorch weights file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); delete it and use the previous checkpoint, "
            "or re-create it (labkit convert / labkit train)") from err


def make_checkpoint(state_dict: dict, network: dict, **extra: Any) -> dict:
    """The labkit checkpoint layout: ``{"format", "network": {class, kwargs}, "state_dict", ...extra}``."""
    return {"format": FORMAT, "network": network, "state_dict": state_dict, **extra}


def read_state_dict(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """``(state_dict, network section or None)`` from a labkit checkpoint or a bare state dict file."""
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], obj.get("network")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointError(f"'{path}' holds neither a labkit checkpoint nor a state dict of tensors")
