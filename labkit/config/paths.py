"""Where relative paths point. A relative path names a file or folder under the current directory when one is
there, else under the project root (the folder holding ``configs/``), whether it exists yet or not; so
notebooks (run from ``notebooks/``) and the CLI (run from the root) read and write the same places. Resolved
configs and run folders record the absolute path."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve(path: str | os.PathLike) -> Path:
    """The absolute path ``path`` names (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / "configs").is_dir():
        return path.absolute()
    return PROJECT_ROOT / path
