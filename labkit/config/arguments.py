"""Checks of command and API arguments, torch-free, made before any heavy work: numbers in range, files that
exist, folders that can really be written (probed, not guessed from permission bits). Each failure is one
:class:`ArgumentError` line naming the argument, the value and the fix."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from labkit.config.errors import LabkitError
from labkit.config.paths import resolve


class ArgumentError(LabkitError, ValueError):
    """An argument that cannot work; the message names it, the value and the fix."""


def integer(value: Any, name: str, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """``value`` as an int in ``[lo, hi]`` (either side open when None)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None \
            else f"<= {hi}"
        raise ArgumentError(f"{name} {value!r}: give an integer {span}" + (f" ({fix})" if fix else ""))
    return value


def number(value: Any, name: str, lo: float, fix: str = "") -> float:
    """``value`` as a finite float >= ``lo``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo:
        raise ArgumentError(
            f"{name} {value!r}: give a finite number >= {lo:g}" + (f" ({fix})" if fix else "")
        )
    return float(value)


def existing(path: str | os.PathLike, what: str, fix: str, kind: str = "") -> Path:
    """The path of an existing file (``kind="file"``), folder (``"folder"``) or either."""
    if not str(path):
        raise ArgumentError(f"{what}: the path is empty; {fix}")
    found = resolve(path)
    if not found.exists():
        raise ArgumentError(f"{what} '{path}' not found: {fix}")
    if kind == "file" and found.is_dir():
        raise ArgumentError(f"{what} '{path}' is a folder: {fix}")
    if kind == "folder" and not found.is_dir():
        raise ArgumentError(f"{what} '{path}' is a file, not a folder: {fix}")
    return found


def writable_folder(path: str | os.PathLike, what: str, option: str = "-o") -> Path:
    """A folder that exists or can be made, where files can really be created (probed with a temporary folder
    in the nearest existing parent, removed again)."""
    if not str(path):
        raise ArgumentError(f"{what}: the path is empty; give a folder ({option})")
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ArgumentError(f"{what} '{path}' is a file: choose a folder ({option})")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".labkit-probe-", dir=probe))
    except OSError as err:
        raise ArgumentError(f"{what} '{path}' cannot be written ({probe}: {err.strerror or err}): choose "
                            f"another folder ({option})") from None
    return folder


def writable_file(path: str | os.PathLike, what: str, option: str) -> Path:
    """A file path whose folder can be written (see :func:`writable_folder`) and that is not a folder."""
    if not str(path):
        raise ArgumentError(f"{what}: the path is empty; give a file ({option})")
    file = Path(path).expanduser().absolute()
    if file.is_dir():
        raise ArgumentError(f"{what} '{path}' is a folder: give a file name ({option})")
    writable_folder(file.parent, f"the folder of {what}", option)
    return file
