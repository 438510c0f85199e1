"""The run folder as one object: config, provenance, history, atomic checkpoints, a writer's lock.

A run folder holds ``config.json`` (the resolved config), ``provenance.json`` (one entry per training
session: versions, git commit, device, command or notebook parameters, config and data hashes),
``history.jsonl`` (one record per epoch), ``last.ckpt`` and ``best.ckpt`` (written atomically), and
``.lock`` while a writer holds it. Guarantees (see :func:`open_for_training`):

* one writer at a time: a second one gets "run folder X is in use by pid N";
* a new run never replaces an existing one silently: it needs ``resume`` or ``overwrite``;
* a resumed run has the stored config, except a longer ``training.n_epochs`` where the schedule allows it;
* after an interrupted write the next writer removes temporary files and repairs ``best.ckpt``.

:func:`load_run` gives a run's network ready to evaluate or integerize; notebooks, sweeps, the integer
flow and the CLI read runs only through this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import nn

from labkit import __version__
from labkit.config.errors import LabkitError
from labkit.config.loading import ConfigError, config_diff
from labkit.config.paths import PROJECT_ROOT, resolve
from labkit.train.build import build_network
from labkit.train.checkpoint import (
    CheckpointError,
    load_file,
    remove_stale_temps,
    save_atomic,
    write_text_atomic,
)
from labkit.train.gd import schedule_extension_problem

CONFIG, PROVENANCE, HISTORY, LAST, BEST, LOCK, LOCK_PID = (
    "config.json", "provenance.json", "history.jsonl", "last.ckpt", "best.ckpt", ".lock", ".lock.pid")
QUANTIZERS = "quantizers.jsonl"  # controller commands, one JSON line each with every quantizer's bounds
RUN_FILES = (CONFIG, PROVENANCE, HISTORY, LAST, BEST, QUANTIZERS)
#: what a resumed run reads from last.ckpt
RESUME_KEYS = ("state_dict", "epoch", "best_top1", "optimizer", "scheduler", "scaler")
#: config keys that may differ between a run and its resumption (they change nothing it computes)
COSMETIC_KEYS = ("name", "description")


class RunError(LabkitError, ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the fix."""


class RunFolder:
    """One run folder (``path``); reading is free, writing needs :meth:`writing` (the lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock: FileLock | None = None

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ reading
    def holds_run(self) -> bool:
        """True when the folder holds (part of) a run: a config, history or checkpoint."""
        return any(self.file(n).exists() for n in (CONFIG, HISTORY, LAST, BEST))

    def config(self) -> dict | None:
        """The stored config (``None`` before the first write)."""
        return _read_json(self.file(CONFIG), dict)

    def provenance(self) -> list[dict]:
        """One entry per training session, oldest first."""
        return _read_json(self.file(PROVENANCE), list) or []

    def history(self) -> list[dict]:
        """The per-epoch records of ``history.jsonl`` (empty list when there is none yet)."""
        return _read_jsonl(self.file(HISTORY))

    def events(self) -> list[dict]:
        """The controllers' commands of ``quantizers.jsonl`` (every quantizer's bounds at each), oldest
        first."""
        return _read_jsonl(self.file(QUANTIZERS))

    def checkpoint(self, which: str = "best") -> Path:
        """``best.ckpt`` or ``last.ckpt`` (``which``), or a checkpoint file given by path."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        return self.file(BEST if which == "best" else LAST)

    def summary(self) -> str:
        """One line: epochs done, best top-1, where."""
        history = self.history()
        cfg = self.config() or {}
        n = cfg.get("training", {}).get("n_epochs", "?")
        if not history:
            return f"{self.path}: no finished epoch"
        return (f"{self.path}: {len(history)} of {n} epochs, final top-1 "
                f"{history[-1]['valid']['top1']:.2f}%, best {history[-1]['best_top1']:.2f}%")

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writing(self) -> Iterator[RunFolder]:
        """Hold the folder's lock (``.lock``, a :class:`filelock.FileLock`: released by the OS when the
        process dies; ``.lock.pid`` names the holder), clear temporary files of interrupted writes, yield; a
        second writer gets :class:`RunError` at once."""
        _make_folder(self.path)
        lock = FileLock(self.file(LOCK), blocking=False)
        try:
            lock.acquire()
        except Timeout:
            holder = self.file(LOCK_PID)
            pid = holder.read_text().strip() if holder.is_file() else "?"
            raise RunError(f"run folder '{self.path}' is in use by pid {pid} (another labkit train writes "
                           "there); wait for it to finish or choose another output folder (-o)") from None
        self.file(LOCK_PID).write_text(f"{os.getpid()}\n")
        self._lock = lock
        try:
            remove_stale_temps(self.path)
            yield self
        finally:
            self._lock = None
            self.file(LOCK_PID).unlink(missing_ok=True)
            lock.release()

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[Path]:
        """Write ``name`` as the lock holder; a failed write (disk full, read-only or vanished folder) is one
        :class:`RunError` line, and what was written before stays (every file is replaced atomically)."""
        if self._lock is None:
            raise RuntimeError(f"{self}: write only inside 'with run.writing():'")
        try:
            yield self.file(name)
        except OSError as err:
            why = {errno.ENOSPC: "the disk is full: free space",
                   errno.EDQUOT: "the disk quota is exceeded: free space",
                   errno.EROFS: "the file system is read-only: make it writable",
                   errno.ENOENT: "the run folder vanished: restore it"}.get(err.errno, "fix the cause")
            raise RunError(f"cannot write '{self.file(name)}' ({err.strerror or err}): {why}, then continue "
                           "with --resume (the files written before are intact)") from None

    def write_config(self, cfg: dict) -> None:
        with self._writing(CONFIG) as path:
            write_text_atomic(json.dumps(cfg, indent=2) + "\n", path)

    def write_history(self, records: list[dict]) -> None:
        with self._writing(HISTORY) as path:
            write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)

    def add_provenance(self, entry: dict) -> None:
        with self._writing(PROVENANCE) as path:
            write_text_atomic(json.dumps(self.provenance() + [entry], indent=2) + "\n", path)

    def save_checkpoint(self, ckpt: dict, best: bool) -> None:
        """``last.ckpt`` (always), then ``best.ckpt`` (when ``best``): a kill between the two is repaired
        by :meth:`repair_best` on the next write."""
        with self._writing(LAST) as path:
            save_atomic(ckpt, path)
        if best:
            with self._writing(BEST) as path:
                shutil.copyfile(self.file(LAST), self.file(f".{BEST}.copy.tmp"))
                os.replace(self.file(f".{BEST}.copy.tmp"), path)

    def clear(self) -> None:
        """Remove the run's files (``overwrite``); other files in the folder stay."""
        if self._lock is None:
            raise RuntimeError(f"{self}: write only inside 'with run.writing():'")
        for name in RUN_FILES:
            self.file(name).unlink(missing_ok=True)

    def repair_best(self, last_epoch: int) -> bool:
        """Make ``best.ckpt`` hold the best epoch up to ``last_epoch`` (by the history's valid top-1, the
        latest of ties) when it is ``last.ckpt``'s epoch and ``best.ckpt`` lags behind; True if repaired."""
        if self._lock is None:
            raise RuntimeError(f"{self}: write only inside 'with run.writing():'")
        records = [r for r in self.history() if r["epoch"] <= last_epoch]
        if not records:
            return False
        best_epoch = max(records, key=lambda r: (r["valid"]["top1"], r["epoch"]))["epoch"]
        best = self.file(BEST)
        stored = load_file(best).get("epoch") if best.is_file() else None
        if best_epoch == last_epoch and stored != best_epoch:
            shutil.copyfile(self.file(LAST), self.file(f".{BEST}.copy.tmp"))
            os.replace(self.file(f".{BEST}.copy.tmp"), best)
            return True
        return False


def read_history(path: str | os.PathLike) -> list[dict]:
    """The per-epoch records of the run folder ``path`` (``[]`` before its first epoch)."""
    return RunFolder(resolve(path)).history()


# ------------------------------------------------------------------------------------------- training
@dataclass
class Resume:
    """What a resumed run continues from: ``last.ckpt`` and the history before its next epoch."""

    checkpoint: dict
    history: list[dict]

    @property
    def start_epoch(self) -> int:
        return int(self.checkpoint["epoch"]) + 1


def check_resumable(stored: dict, requested: dict, folder: Path) -> None:
    """Refuse a resume whose config differs from the run's, except a longer ``training.n_epochs`` that the
    schedule can follow (HandScheduler, StepLR, MultiStepLR, CosineAnnealingLR with its own ``T_max``)."""
    diffs = [d for d in config_diff(stored, requested) if d[0].split(".")[0] not in COSMETIC_KEYS]
    extension = [d for d in diffs if d[0] == "training.n_epochs"]
    others = [d for d in diffs if d[0] != "training.n_epochs"]
    if others:
        key, old, new = others[0]
        more = f" (and {len(others) - 1} more difference(s))" if len(others) > 1 else ""
        raise RunError(f"--resume: the config differs from the run's in '{key}': the run has {_show(old)}, "
                       f"the request {_show(new)}{more}. Resume with the run's own config "
                       f"({folder / CONFIG}), or train into a new folder (-o)")
    if extension:
        _, old, new = extension[0]
        if isinstance(old, int) and isinstance(new, int) and new < old:
            raise RunError(f"--resume: training.n_epochs {new} is below the run's {old}; a run only extends")
        problem = schedule_extension_problem(stored["training"]["gd"])
        if problem:
            raise RunError(f"--resume with training.n_epochs {old} -> {new}: {problem}. Train into a new "
                           "folder (-o) instead")


def open_for_training(folder: RunFolder, cfg: dict, *, resume: bool = False,
                      overwrite: bool = False) -> Resume | None:
    """Checks before a training session writes into ``folder`` (call it inside ``folder.writing()``).

    A folder that holds a run needs ``resume`` (the stored config must match, :func:`check_resumable`) or
    ``overwrite`` (its run files are removed first). Returns what to resume from, or ``None`` for a fresh run.
    """
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if not folder.holds_run():
        return None
    if overwrite:
        folder.clear()
        return None
    if not resume:
        raise RunError(f"run folder '{folder.path}' already holds a run "
                       f"({folder.summary().split(': ', 1)[1]}): continue it with --resume, replace it with "
                       "--overwrite, or write elsewhere with -o")
    stored = folder.config()
    if stored is None:
        raise RunError(f"run folder '{folder.path}' has checkpoints or history but no {CONFIG}: it is not a "
                       "labkit run; --overwrite it or choose another folder")
    check_resumable(stored, cfg, folder.path)
    last = folder.checkpoint("last")
    if not last.is_file():
        return None
    ckpt = load_file(last)
    lacking = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if lacking:
        raise CheckpointError(f"'{last}' is no training checkpoint of labkit (it lacks "
                              f"{', '.join(lacking)}): --overwrite the run, or restore the file")
    folder.repair_best(int(ckpt["epoch"]))
    history = [r for r in folder.history() if r["epoch"] < int(ckpt["epoch"]) + 1]
    return Resume(ckpt, history)


def describe_provenance(entry: dict) -> str:
    """One line of a provenance entry: when, labkit version and commit, torch, device, config and data
    hashes."""
    return (f"trained {entry['time']}  labkit {entry['labkit']} ({entry.get('git') or 'no git'})  torch "
            f"{entry['torch']}  {entry['device']}  config {entry['config_sha256'][:12]}  data "
            f"{entry['data_sha256'][:12]}" + (f"  resumed at epoch {entry['resumed_at_epoch']}"
                                              if entry.get("resumed_at_epoch") is not None else ""))


def provenance_entry(cfg: dict, device: str, data_hash: str, resumed_at: int | None = None,
                     parameters: dict | None = None) -> dict:
    """Versions, git commit, device, command line (or ``parameters``), config and data hashes."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labkit": __version__, "git": git_commit(),
             "python": platform.python_version(), "torch": torch.__version__, "device": device,
             "host": platform.node(), "config_sha256": config_hash(cfg), "data_sha256": data_hash}
    if parameters is not None:
        entry["parameters"] = parameters
    else:
        entry["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    if resumed_at is not None:
        entry["resumed_at_epoch"] = resumed_at
    return entry


def config_hash(cfg: dict) -> str:
    """sha256 of the config as canonical JSON, cosmetic keys left out."""
    core = {k: v for k, v in cfg.items() if k not in COSMETIC_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def git_commit() -> str | None:
    """``<commit>[+dirty]`` of the labkit checkout, or None outside a git checkout."""
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedRun:
    """A run's network in eval mode (``net``), its config and the checkpoint it came from."""

    net: nn.Module
    config: dict
    checkpoint: dict
    path: Path

    @property
    def quantized(self) -> bool:
        return bool(self.config["network"].get("quantize"))


def load_run(path: str | os.PathLike, which: str = "best", config: dict | None = None) -> LoadedRun:
    """The network of a run folder (its ``best.ckpt`` or ``last.ckpt``) or of a checkpoint file, in eval mode.

    The config is the run's own (``config`` replaces it, e.g. with another ``data.root``); its
    ``network.pretrained`` is not read (the checkpoint holds the weights). For a quantized run whose
    ``best.ckpt`` predates the start of every quantizer, ``last.ckpt`` is used instead (with a warning).
    """
    path = resolve(path)
    folder = RunFolder(path) if path.is_dir() else None
    ckpt_path = folder.checkpoint(which) if folder else path
    if folder and not ckpt_path.is_file():
        raise RunError(
            f"'{path}' holds no {ckpt_path.name}: is it a run folder of labkit train? "
            f"({RunFolder(path).summary() if RunFolder(path).holds_run() else 'it holds no run'})"
        )
    ckpt = load_file(ckpt_path)
    if folder and which == "best" and folder.checkpoint("last").is_file() and not _all_started(ckpt):
        warnings.warn(f"{ckpt_path} was saved (epoch {ckpt.get('epoch')}) before every quantizer had "
                      f"started: using {folder.checkpoint('last')} instead", stacklevel=2)
        ckpt_path = folder.checkpoint("last")
        ckpt = load_file(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{ckpt_path}' is not a labkit checkpoint (no state_dict): pass a run folder "
                              "or a last.ckpt / best.ckpt written by labkit train")
    cfg = config or ckpt.get("config")
    if cfg is None:
        raise CheckpointError(f"'{ckpt_path}' carries no config: pass the config it was trained with")
    cfg = {**cfg, "network": {**cfg["network"], "pretrained": None}}
    try:
        net, _ = build_network(cfg, pretrained=False)
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError) as err:
        if isinstance(err, (ConfigError, CheckpointError)):
            raise
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise CheckpointError(
            f"'{ckpt_path}' does not fit the network of its config ({detail}): evaluate it "
            "with the config it was trained with (width, classes, network.quantize)"
        ) from None
    return LoadedRun(net.eval(), cfg, ckpt, ckpt_path)


def _all_started(ckpt) -> bool:
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    return all(bool(v) for k, v in state.items() if k.endswith("started_flag"))


# ------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path, kind: type) -> Any:
    """The JSON value of ``path`` (None when missing); anything but a ``kind`` is a damaged run folder."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"'{path}' is not valid JSON ({err}); the run folder is damaged: restore the file or "
                       "start a new run") from None
    if not isinstance(value, kind):
        raise RunError(f"'{path}' holds {type(value).__name__}, not a JSON "
                       f"{'object' if kind is dict else 'list'}; the run folder is damaged: restore the file "
                       "or start a new run")
    return value


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (``[]`` when the file is missing); a damaged line is named by its number."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RunError(f"'{path}' is damaged at line {number} ({err.msg}); delete it and resume, or "
                           "start a new run") from None
    return records


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise RunError(f"output folder '{path}' is a file: choose a folder path (-o)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(
            f"cannot create run folder '{path}': {err.strerror}; choose a writable place (-o)"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"run folder '{path}' is not writable: fix its permissions or choose another folder "
                       "(-o)")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
