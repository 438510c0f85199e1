"""A sweep folder's bookkeeping: which job ran which point, how each point stands, the jobs' console lines.

``sweep.json`` (written by the sweep command only, under ``.sweep.lock``) holds the launcher and, per point,
its run folder, executed notebook, config, parameters and every job submitted for it (id, launcher, host,
time).
``points/<name>.json`` is the point's outcome, written by its job when it ends (the results-table row: ``ok``
with top-1, or ``failed`` with a one-line error); a job that is killed writes none. A point's state:

=============== =====================================================================================
``finished``    the outcome says ok, for the parameters asked now (top-1 from it)
``failed``      the outcome says failed (its error), for the parameters asked now
``queued``      its job waits (Slurm: pending), or the sweep command that will submit it still runs
``running``     its job runs (epochs done from the run folder's history)
``interrupted`` its job ended without an outcome (killed, timed out, node lost); a rerun resumes it
``not started`` no job was submitted, and no sweep command runs to submit one
``unknown``     its job's state cannot be asked here (a Slurm job seen from outside the cluster)
=============== =====================================================================================
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from labkit.config.tables import Table
from labkit.lab.launchers import job_state, last_error_line, log_files, slurm_final_state
from labkit.train.checkpoint import write_text_atomic
from labkit.train.runs import RunFolder

RECORD = "sweep.json"
JOBS = "jobs"
OUTCOMES = "points"
LOCK = ".sweep.lock"
STATES = ("finished", "failed", "queued", "running", "interrupted", "not started", "unknown")


def read_record(folder: str | Path) -> dict:
    """``sweep.json`` of ``folder`` (``{}`` when there is none yet)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(folder: str | Path, record: dict) -> None:
    write_text_atomic(json.dumps(record, indent=1) + "\n", Path(folder) / RECORD)


def outcome_file(folder: str | Path, name: str) -> Path:
    return Path(folder) / OUTCOMES / f"{name}.json"


def read_outcome(folder: str | Path, name: str) -> dict | None:
    path = outcome_file(folder, name)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # a torn file of a job killed while writing it: no outcome


def write_outcome(folder: str | Path, name: str, row: dict) -> None:
    path = outcome_file(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(row) + "\n", path)


def add_job(record: dict, name: str, job_id: str, launcher: str) -> None:
    """Note in ``record`` that job ``job_id`` now runs point ``name``."""
    record["points"][name].setdefault("jobs", []).append(
        {"id": str(job_id), "launcher": launcher, "host": socket.gethostname(),
         "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def sweep_alive(record: dict) -> bool:
    """The sweep command that wrote ``record`` still runs (on this machine)."""
    pid, host = record.get("pid"), record.get("host")
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except OSError:
        return False
    return True


def point_state(folder: str | Path, name: str, entry: dict, sweeping: bool = False) -> dict:
    """``{"run", "state", "job", "epochs", "top1", "error"}`` of one point (module docstring); ``sweeping``:
    a sweep command still runs that will submit what has no job yet."""
    folder = Path(folder)
    jobs = entry.get("jobs", [])
    last = jobs[-1] if jobs else None
    row = {"run": name, "job": last["id"] if last else "", "epochs": _epochs(entry), "top1": None,
           "error": ""}
    outcome = read_outcome(folder, name)
    if outcome is not None and outcome.get("parameters") == entry.get("parameters"):
        ok = outcome.get("status") == "ok"
        return {**row, "state": "finished" if ok else "failed", "job": outcome.get("job") or row["job"],
                "top1": outcome.get("final_top1") if ok else None,
                "error": "" if ok else outcome.get("error", "")}
    if last is None:
        return {**row, "state": "queued" if sweeping else "not started"}
    state = job_state(last["launcher"], folder / JOBS, last["id"], last.get("host"))
    if state in ("queued", "running", "unknown"):
        return {**row, "state": state}
    how = slurm_final_state(folder / JOBS, last["id"]) if last["launcher"] == "slurm" else "ended"
    error = last_error_line(folder / JOBS, last["id"])
    return {**row, "state": "interrupted",
            "error": f"job {last['id']} {how.lower()} without an outcome" + (f" ({error})" if error else "")}


def _epochs(entry: dict) -> str:
    """``done/asked`` epochs of the point's run folder."""
    done = len(RunFolder(entry["run_dir"]).history()) if Path(entry["run_dir"]).is_dir() else 0
    return f"{done}/{entry.get('parameters', {}).get('epochs', '?')}"


def status_table(folder: str | Path) -> Table:
    """Every point of the sweep in ``folder`` with its state, job, epochs, top-1 and error."""
    folder = Path(folder)
    record = read_record(folder)
    sweeping = sweep_alive(record)
    rows = [point_state(folder, name, entry, sweeping) for name, entry in record.get("points", {}).items()]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return Table(rows, ["run", "state", "job", "epochs", "top1", "error"],
                 title=f"sweep {folder} ({record.get('launcher', '?')} launcher): {len(rows)} points, {said}")


class LogTail:
    """New complete lines of a job's stdout since the last call (what its notebook printed)."""

    def __init__(self, jobs_folder: str | Path, job_id: str):
        self.path = log_files(jobs_folder, job_id)[0]
        self.offset = 0
        self.rest = ""

    def lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        *lines, self.rest = (self.rest + text).split("\n")
        return [line for line in lines if line.strip()]

