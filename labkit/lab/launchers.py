"""Where sweep jobs run: submitit executors for this machine (``local``) and for Slurm; the state of a job.

A job is one grid point: a function and its arguments that submitit pickles into the sweep's ``jobs/`` folder
and runs in a process of its own, here (``local``: ``python -m submitit.local._local``) or on a node that
``sbatch`` gives (``slurm``). ``jobs/`` then holds each job's ``<id>_0_log.out`` / ``.err`` (and for Slurm its
``<id>_submission.sh``). The Slurm options come from the command line or the ``"slurm"`` section of a grid
file (:class:`SlurmOptions`); :func:`sbatch_script` writes the script a submission would send, without a
cluster.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmJob

from labkit.config.errors import LabkitError

LAUNCHERS = ("local", "slurm")
#: a local job runs until it ends (submitit's local default would stop it after 2 minutes)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365
#: sbatch options that the launcher sets itself (a point's name, its log files, its GPUs and tasks)
RESERVED_SBATCH = {"job-name", "output", "error", "gpus-per-node", "ntasks-per-node", "partition", "time",
                   "array", "open-mode", "signal", "wckey"}
#: Slurm states -> sweep states
SLURM_STATES = {"PENDING": "queued", "REQUEUED": "queued", "CONFIGURING": "queued", "RESIZING": "queued",
                "SUSPENDED": "queued", "RUNNING": "running", "COMPLETING": "running"}


class LauncherError(LabkitError, ValueError):
    """A launcher option that cannot work (unknown launcher, a bad Slurm time or sbatch option)."""


@dataclass(frozen=True)
class SlurmOptions:
    """What every Slurm job of a sweep asks for: ``partition``, ``gpus`` per job (one task per GPU), ``time``
    limit in minutes, ``cpus`` per task, ``mem_gb`` per node, extra ``sbatch`` options
    (``{"account": "lab"}``) and ``setup`` shell lines run before the job (``module load cuda``,
    ``source venv/bin/activate``)."""

    partition: str | None = None
    gpus: int = 1
    time: int = 24 * 60
    cpus: int | None = None
    mem_gb: float | None = None
    sbatch: dict = field(default_factory=dict)
    setup: tuple = ()

    @classmethod
    def from_section(cls, section: dict | None, **given) -> SlurmOptions:
        """Options from a grid file's ``"slurm"`` section, then the non-None ``given`` ones (the command line;
        its ``sbatch`` options and ``setup`` lines are added to the section's)."""
        section = dict(section or {})
        known = [f.name for f in fields(cls)]
        for key in section:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise LauncherError(f"slurm option '{key}' is unknown{hint}: use {', '.join(known)}")
        sbatch = {**parse_sbatch(section.get("sbatch", {})), **parse_sbatch(given.pop("sbatch", None) or {})}
        setup = (*_setup(section.get("setup", ())), *_setup(given.pop("setup", None) or ()))
        section.update({k: v for k, v in given.items() if v is not None})
        return cls(partition=_partition(section.get("partition")),
                   gpus=_count(section.get("gpus", 1), "gpus", 0),
                   time=parse_time(section.get("time", 24 * 60)),
                   cpus=None if section.get("cpus") is None else _count(section["cpus"], "cpus", 1),
                   mem_gb=_mem(section.get("mem_gb")), sbatch=sbatch, setup=setup)

    def tasks(self) -> int:
        """Processes per job: one per GPU (DistributedDataParallel), one on a CPU-only job."""
        return max(1, self.gpus)


def parse_time(value) -> int:
    """A Slurm time limit in whole minutes (rounded up), in Slurm's spellings: ``M``, ``M:S``, ``H:M:S``,
    ``D-H``, ``D-H:M``, ``D-H:M:S`` (``720``, ``"12:00:00"``, ``"2-00:00:00"``)."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text)
    if isinstance(value, bool) or m is None:
        raise LauncherError(f"slurm time '{value}' is not a time limit: give minutes (e.g. 720), H:MM:SS or "
                            "D-HH:MM:SS")
    days, parts = int(m.group(1) or 0), [int(p) for p in m.group(2).split(":")]
    if m.group(1) is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, sec = (parts + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        h, mi, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    minutes = math.ceil((days * 86400 + h * 3600 + mi * 60 + sec) / 60)
    if minutes < 1:
        raise LauncherError(f"slurm time '{value}' is under a minute: give a positive time limit")
    return minutes


def parse_sbatch(options) -> dict:
    """Extra sbatch options: ``["account=lab", "qos=high", "exclusive"]`` or ``{"account": "lab"}`` ->
    ``{"account": "lab", "qos": "high", "exclusive": True}`` (names without leading dashes)."""
    if isinstance(options, dict):
        items = list(options.items())
    else:
        items = [tuple(str(o).split("=", 1)) if "=" in str(o) else (str(o), True) for o in (options or [])]
    out = {}
    for key, value in items:
        key = str(key).strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise LauncherError(f"sbatch option '{key}' is not an option name: write NAME=VALUE, e.g. "
                                "account=lab")
        if key in RESERVED_SBATCH:
            raise LauncherError(f"sbatch option '{key}' is set by the sweep: use --partition, --gpus or "
                                "--time (or the slurm section's partition, gpus, time)")
        out[key] = value
    return out


def _partition(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[\w.,-]+", value):
        raise LauncherError(f"slurm partition {value!r} is not a partition name (e.g. gpu)")
    return value


def _count(value, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LauncherError(f"slurm {what} {value!r}: give an integer >= {least}")
    return value


def _mem(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LauncherError(f"slurm mem_gb {value!r}: give the memory per node in GB (> 0)")
    return float(value)


def _setup(lines) -> tuple:
    lines = [lines] if isinstance(lines, str) else list(lines)
    if not all(isinstance(line, str) and "\n" not in line for line in lines):
        raise LauncherError("slurm setup: give shell lines (strings without newlines), e.g. "
                            "[\"source ~/venv/bin/activate\"]")
    return tuple(lines)


# ------------------------------------------------------------------------------------------ executors
def local_executor(folder: str | Path, tasks: int = 1) -> submitit.LocalExecutor:
    """Jobs as processes on this machine (they live as long as they run; no time limit)."""
    executor = submitit.LocalExecutor(folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=tasks)
    return executor


def slurm_parameters(options: SlurmOptions, name: str, note: str = "") -> dict:
    """The ``SlurmExecutor`` parameters of one job: its name, the options, ``note`` as a comment line."""
    params = {"job_name": name, "time": options.time, "nodes": 1, "ntasks_per_node": options.tasks(),
              "setup": [*(f"# {line}" for line in note.splitlines()), *options.setup],
              "additional_parameters": dict(options.sbatch)}
    if options.partition:
        params["partition"] = options.partition
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.cpus:
        params["cpus_per_task"] = options.cpus
    if options.mem_gb:
        params["mem"] = f"{options.mem_gb:g}GB"
    return params


def slurm_executor(folder: str | Path, options: SlurmOptions, name: str, note: str = "",
                   script_only: bool = False) -> submitit.SlurmExecutor:
    """A ``SlurmExecutor`` for one job; ``script_only``: one that needs no cluster (:func:`sbatch_script`)."""
    cls = _ScriptOnly if script_only else submitit.SlurmExecutor
    try:
        executor = cls(folder)
    except RuntimeError as err:  # no srun on this machine
        raise LauncherError(f"--launcher slurm: {err} (run the sweep on a login node of the cluster, or "
                            "--dry-run to write the sbatch scripts here)") from None
    executor.update_parameters(**slurm_parameters(options, name, note))
    return executor


class _ScriptOnly(submitit.SlurmExecutor):
    """A SlurmExecutor that only writes scripts: it does not look for ``srun``."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_script(folder: str | Path, options: SlurmOptions, name: str, note: str = "") -> str:
    """The sbatch script that submitting job ``name`` writes, here without a cluster: submitit's own text for
    these parameters (``SlurmExecutor._make_submission_file_text``, the method its ``submit`` calls)."""
    executor = slurm_executor(folder, options, name, note, script_only=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ------------------------------------------------------------------------------------------ job states
def job_state(launcher: str, folder: str | Path, job_id: str, host: str | None = None) -> str:
    """``queued``, ``running``, ``ended`` (the job no longer runs: its outcome, if any, says how it went) or
    ``unknown`` (a local job of another machine, or Slurm's accounting not reachable)."""
    if launcher == "local":
        if host and host != socket.gethostname():
            return "unknown"
        return "running" if local_job_alive(job_id, folder) else "ended"
    if shutil.which("sacct") is None:  # not on the cluster: Slurm's accounting cannot be asked
        return "unknown"
    state = SlurmJob(Path(folder), str(job_id)).state.split(" ")[0].upper()
    if state == "UNKNOWN":
        return "unknown"
    return SLURM_STATES.get(state, "ended")


def slurm_final_state(folder: str | Path, job_id: str) -> str:
    """Slurm's word for how a job ended (``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL`` ...)."""
    return SlurmJob(Path(folder), str(job_id)).state


def local_job_alive(job_id: str, folder: str | Path) -> bool:
    """The local job's controller process (pid ``job_id``) still runs for this ``jobs`` folder."""
    try:
        pid = int(job_id)
    except ValueError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.parent.is_dir() and sys.platform.startswith("linux"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return b"submitit.local._local" in words and str(Path(folder)).encode() in words
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def log_files(folder: str | Path, job_id: str) -> tuple[Path, Path]:
    """``(stdout, stderr)`` of task 0 of the job."""
    paths = submitit.core.utils.JobPaths(Path(folder), job_id=str(job_id), task_id=0)
    return paths.stdout, paths.stderr


def last_error_line(folder: str | Path, job_id: str) -> str:
    """The last line of the job's stderr that names an error (or its last non-empty line), for a job that
    ended without writing its outcome."""
    _, err = log_files(folder, job_id)
    lines = [line.strip() for line in (err.read_text(errors="replace").splitlines() if err.is_file() else [])
             if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (named or lines or [""])[-1][:300]
