"""Where relative paths point: the current directory first, then the project root (the folder holding
``configs/``), so notebooks (run from ``notebooks/``) and the CLI (run from the root) read the same paths."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve(path: str | os.PathLike, must_exist: bool = False) -> Path:
    """``path`` if absolute or present under the current directory, else ``PROJECT_ROOT / path``."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = PROJECT_ROOT / path
    if candidate.exists() or not must_exist:
        return candidate if (PROJECT_ROOT / "configs").is_dir() else path
    return path
