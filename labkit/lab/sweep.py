"""Sweeps: every grid point one job (submitit), here or on a Slurm cluster, gathered into a results table.

A grid is ``{"algorithm": [...], "bits": [...], "budget": [...], "seed": [...]}`` (a grid file may add a
``"slurm"`` section, :class:`labkit.lab.launchers.SlurmOptions`); each point trains the config
``<configs>/config.<algorithm>.json`` (``configs/<data>/`` by default) with ``seed`` and ``epochs``: for a
``bits`` point with ``w_bits = a_bits = bits`` (every layer); for a ``budget`` point
(:func:`labkit.config.budget.parse_budget`, e.g. ``"weight_bytes=uniform:3,BOPs=uniform:3"``) the plan
:func:`labkit.precision.allocate.propose` finds for that budget (sensitivity of the config's
``network.pretrained`` checkpoint, cached beside it), written as ``plans/<algorithm>-<budget>.json``.

Before anything runs, every point is checked (:mod:`labkit.lab.sweep_check`); then each point becomes one job
(:func:`run_point`) that runs what a local point runs, into its own run folder ``<sweep>/<point>/``: the
algorithm's training notebook (``04_tqt_training`` for ``tqt*``, else ``03_pact_training``) through papermill,
kept as ``<sweep>/<point>.ipynb`` (runner ``notebook``), or what ``labkit train`` runs (runner ``train``;
one process per GPU on a multi-GPU Slurm job). Launchers: ``local`` (jobs as processes here, ``parallel`` at a
time; their epoch lines come to ``log``; the call returns when all have ended) or ``slurm`` (``sbatch``; the
call returns once they are submitted, or when they end with ``wait``). ``sweep.json`` records the job ids,
each job writes its outcome (:mod:`labkit.lab.sweep_jobs`), :func:`sweep_status` shows every point's state.
Calling the same sweep again skips finished points, leaves running ones alone and resumes the others from
their run folder (a run folder resumes bit-exactly). When the jobs have ended, ``results.csv`` and
``results.png`` are written: one row per point with top-1, the plan's weight bytes, activation bytes and BOPs,
or the error.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import submitit
from filelock import FileLock, Timeout
from matplotlib.figure import Figure
from papermill.exceptions import PapermillExecutionError

from labkit.config.budget import SENSITIVITY_METHOD, budget_slug, parse_budget
from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.lab.launchers import SlurmOptions, local_executor, sbatch_script, slurm_executor
from labkit.lab.notebooks import execute_notebook
from labkit.lab.steps import ensure_pretrained, qat_config, run_config
from labkit.lab.sweep_check import check_points
from labkit.lab.sweep_grid import (
    GRID_KEYS,
    TRAINING_NOTEBOOK,
    SweepError,
    algorithm_config,
    check_settings,
    expand_grid,
    run_name,
    slurm_options,
    training_notebook,
)
from labkit.lab.sweep_jobs import (
    JOBS,
    LOCK,
    LogTail,
    add_job,
    outcome_file,
    point_state,
    read_outcome,
    read_record,
    status_table,
    write_outcome,
    write_record,
)
from labkit.lab.probe import propose_probed
from labkit.precision.allocate import propose
from labkit.precision.pareto import describe_plan, paired_table
from labkit.precision.sensitivity import DEFAULT_BITS
from labkit.train.loop import train
from labkit.train.runs import RunFolder, read_history

__all__ = ["SweepError", "expand_grid", "run_sweep", "run_point", "sweep_status", "results_figure",
           "run_name", "algorithm_config", "training_notebook"]

#: seconds between looks at running jobs (local) and at the Slurm queue (``wait``)
POLL_LOCAL_S, POLL_SLURM_S = 1.0, 60.0
#: submitit's own lines in a job's stdout (start, pickle, completion), not forwarded to ``log``
SUBMITIT_CHATTER = re.compile(r"^submitit (INFO|DEBUG) ")
COST_COLUMNS = ("weight_bytes", "act_bytes", "BOPs")
COLUMNS = ("run", "algorithm", "bits", "budget", "seed", "status", "final_top1", "best_top1", *COST_COLUMNS,
           "epochs", "seconds", "job", "notebook", "config", "error")


def run_sweep(grid: dict, output_dir: str | Path = "runs/sweep", *, epochs: int = 2, data: str = "embedded",
              configs: str | Path | None = None, data_root: str | None = None, device: str = "auto",
              pretrained: str | None = None, notebook: str | None = None, plan_bits=DEFAULT_BITS,
              calib: int = 256, sensitivity: str = SENSITIVITY_METHOD, probe: bool = True,
              launcher: str = "local", parallel: int = 1,
              slurm: SlurmOptions | dict | None = None, runner: str = "notebook", wait: bool = False,
              dry_run: bool = False, log=print) -> Table:
    """Check every point, then run each as a job (module docstring); returns the results table (also written
    to ``results.csv`` and ``results.png``) once the jobs have ended; the status table when Slurm jobs were
    submitted without ``wait``; the scripts with ``dry_run``.

    ``pretrained`` None: each config's own ``network.pretrained``. Budget points choose among ``plan_bits``
    (weights and activations) with the ``sensitivity`` method measured on ``calib`` training images, the
    candidates probed (:func:`labkit.lab.probe.propose_probed`) unless ``probe`` is false.
    ``slurm``: options of the Slurm jobs (a dict like a grid file's ``"slurm"`` section); ``wait``: a Slurm
    sweep returns when its jobs end (a local one always does); ``dry_run``: write each job's sbatch script to
    ``jobs/<point>.sbatch`` instead of submitting it (no FP32 run trained, no plan proposed)."""
    grid = dict(grid)
    section = grid.pop("slurm", None)
    points = expand_grid(grid)
    names = [run_name(p) for p in points]
    found = {p["algorithm"]: algorithm_config(p["algorithm"], data, configs) for p in points}
    options = slurm_options(launcher, section, slurm, dry_run)
    bits = check_settings(epochs=epochs, calib=calib, plan_bits=plan_bits, sensitivity=sensitivity,
                          probe=probe, launcher=launcher, parallel=parallel, runner=runner, slurm=options)
    _check_request(notebook, launcher, wait and not dry_run)
    check_points(points, found, names, epochs=epochs, data_root=data_root, pretrained=pretrained,
                 plan_bits=bits, device=device, launcher=launcher)
    out = resolve(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"epochs": epochs, "data_root": data_root, "device": device, "notebook": notebook,
                "pretrained": str(resolve(pretrained)) if pretrained else None, "runner": runner,
                "plan_bits": bits, "calib": calib, "sensitivity": sensitivity, "probe": probe}
    with _sweep_lock(out):
        tasks = _tasks(points, names, found, out, settings, log, prepare=not dry_run)
        record = _record(out, tasks, launcher, grid)
        try:
            todo = [t for t in tasks if _needs_job(out, t, record, log)]
            if launcher == "local":
                _run_local(out, todo, record, parallel, log)
            elif dry_run:
                return _write_scripts(out, todo, options, log)
            else:
                _submit_slurm(out, todo, record, options, log)
                if not wait:
                    log(f"[sweep] {len(todo)} job(s) submitted; watch them with: labkit sweep --status {out}")
                    return status_table(out)
                _wait_slurm(out, record, log)
        finally:
            record["pid"] = None
            write_record(out, record)
        return _results(out, tasks, record, log)


def sweep_status(output_dir: str | Path) -> Table:
    """Every point of the sweep in ``output_dir``: queued, running (epochs done), finished (top-1), failed
    (its error), interrupted or not started (:mod:`labkit.lab.sweep_jobs`)."""
    out = resolve(output_dir)
    if not read_record(out):
        raise SweepError(f"'{out}' holds no sweep (no sweep.json): pass the folder a sweep wrote (-o of "
                         "labkit sweep)")
    return status_table(out)


# ------------------------------------------------------------------------------------------ the jobs
def run_point(task: dict) -> dict:
    """One grid point, in its job: train it (``task["runner"]``), then write its outcome (the results row:
    ``ok`` with top-1 and costs, or ``failed`` with one line of error). A killed job writes none."""
    try:
        env = submitit.JobEnvironment()
        job_id, rank = str(env.job_id), env.global_rank
    except RuntimeError:  # called outside a submitit job
        env, job_id, rank = None, "", 0
    row = {**task["row"], "job": job_id, "parameters": task["parameters"]}
    t0 = time.perf_counter()
    try:
        if task["runner"] == "train":
            _train_point(task, env)
        else:
            execute_notebook(task["notebook"], task["executed"], task["parameters"],
                             log=lambda line: print(line.strip(), flush=True))
        row.update(_finished(task["run_dir"]))
    except PapermillExecutionError as err:
        row.update(status="failed", error=f"cell {err.exec_count}: {err.ename}: {_first_line(err.evalue)}")
    except Exception as err:  # noqa: BLE001 - the point fails, the outcome says why
        traceback.print_exc()
        row.update(status="failed", error=f"{type(err).__name__}: {_first_line(str(err))}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if rank == 0:
        write_outcome(task["sweep"], task["name"], row)
    return row


def _train_point(task: dict, env) -> None:
    """What ``labkit train`` runs, on the config the notebook would build; one process per task (GPU)."""
    if env is not None and env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    p = task["parameters"]
    cfg = qat_config(p["config"], data_root=p["data_root"], epochs=p["epochs"], pretrained=p["pretrained"],
                     w_bits=p["w_bits"], a_bits=p["a_bits"], seed=p["seed"])
    train(cfg, p["output_dir"], resume=True, device=p["device"], progress=False,
          parameters={k: p[k] for k in ("config", "epochs", "w_bits", "a_bits", "seed")},
          log=lambda line: print(line, flush=True))


def _finished(run_dir: str) -> dict:
    history = read_history(run_dir)
    if not history:
        raise RuntimeError(f"the run wrote no history in {run_dir}")
    costs = describe_plan(RunFolder(run_dir).config())
    return {"status": "ok", "final_top1": history[-1]["valid"]["top1"], "best_top1": history[-1]["best_top1"],
            **{k: costs[k] for k in COST_COLUMNS}}


def _first_line(text) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


# ------------------------------------------------------------------------------------------ preparing
def _check_request(notebook: str | None, launcher: str, wait: bool) -> None:
    if wait and launcher == "slurm" and shutil.which("sacct") is None:
        raise SweepError("--wait follows the jobs through Slurm's accounting (sacct), which this machine "
                         "does not have: leave --wait out and watch with labkit sweep --status")
    if notebook is not None and not resolve(f"notebooks/{notebook}.ipynb").is_file():
        raise SweepError(f"notebook '{notebook}' not found in notebooks/: give the name of a training "
                         f"notebook, e.g. {TRAINING_NOTEBOOK}")


def _tasks(points: list[dict], names: list[str], configs: dict, out: Path, settings: dict, log,
           prepare: bool = True) -> list[dict]:
    """Each point's job: the notebook and its parameters, run folder, results row. With ``prepare``, the FP32
    checkpoints are made when missing (embedded) and the budget plans proposed, here, before any job starts
    (jobs would race for them); without, a budget point names the plan file it would get."""
    if prepare:
        for config in dict.fromkeys(configs.values()):
            ensure_pretrained(run_config(str(config), data_root=settings["data_root"],
                                         pretrained=settings["pretrained"]), progress=False)
    plans: dict[tuple, Path] = {}
    tasks = []
    for point, name in zip(points, names):
        config = configs[point["algorithm"]]
        if "budget" in point:
            key = (point["algorithm"], point["budget"])
            if key not in plans:
                plans[key] = _propose(config, point, out / "plans", settings, log) if prepare else \
                    _plan_file(out / "plans", point)
            config = plans[key]
        bits = point.get("bits")
        executed = out / f"{name}.ipynb"
        notebook = settings["notebook"] or training_notebook(point["algorithm"])
        parameters = {"config": str(config), "w_bits": bits, "a_bits": bits, "seed": point["seed"],
                      "epochs": settings["epochs"], "output_dir": str(out / name),
                      "device": settings["device"], "data_root": settings["data_root"],
                      "pretrained": settings["pretrained"]}
        row = {"run": name, **point, "notebook": str(executed) if settings["runner"] == "notebook" else "",
               "epochs": settings["epochs"], "config": str(config)}
        tasks.append({"name": name, "sweep": str(out), "runner": settings["runner"], "notebook": notebook,
                      "executed": str(executed), "run_dir": str(out / name), "parameters": parameters,
                      "row": row})
    return tasks


def _propose(config: Path, point: dict, folder: Path, settings: dict, log) -> Path:
    """The proposed plan of ``point``'s budget for ``config``, saved as ``<folder>/<algorithm>-<budget>.json``
    (:func:`_plan_file`)."""
    cfg = run_config(str(config), data_root=settings["data_root"], pretrained=settings["pretrained"])
    choose = {"bits": settings["plan_bits"], "n_calib": settings["calib"],
              "method": settings.get("sensitivity", SENSITIVITY_METHOD)}
    if settings.get("probe", True):
        allocation, _ = propose_probed(cfg, point["budget"], **choose, device=settings["device"], log=log)
    else:
        allocation = propose(cfg, point["budget"], **choose)
    path = allocation.save(_plan_file(folder, point))
    log(f"[sweep] {allocation.summary()} -> {path}")
    return path


def _plan_file(folder: Path, point: dict) -> Path:
    return folder / f"{point['algorithm']}-{budget_slug(parse_budget(point['budget']))}.json"


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    """One sweep command per sweep folder at a time (released by the OS if the command dies)."""
    lock = FileLock(out / LOCK, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        pid = read_record(out).get("pid") or "?"
        raise SweepError(f"sweep folder '{out}' is in use by another sweep command (pid {pid}): wait for it, "
                         f"or watch it with labkit sweep --status {out}") from None
    try:
        yield
    finally:
        lock.release()


def _record(out: Path, tasks: list[dict], launcher: str, grid: dict) -> dict:
    """``sweep.json`` with this sweep's points (their earlier jobs kept), marked as run by this process."""
    record = read_record(out)
    points = record.get("points", {})
    for t in tasks:
        jobs = points.get(t["name"], {}).get("jobs", [])
        points[t["name"]] = {"point": {k: v for k, v in t["row"].items() if k in GRID_KEYS},
                             "run_dir": t["run_dir"], "notebook": t["row"]["notebook"],
                             "config": t["row"]["config"], "parameters": t["parameters"], "jobs": jobs}
    record.update(launcher=launcher, grid=grid, pid=os.getpid(), host=socket.gethostname(), points=points)
    write_record(out, record)
    return record


def _needs_job(out: Path, task: dict, record: dict, log) -> bool:
    """False for a point that is finished or whose job runs or may run (said in ``log``)."""
    state = point_state(out, task["name"], record["points"][task["name"]])
    if state["state"] == "finished":
        log(f"[sweep] {task['name']}: finished (top-1 {state['top1']:.2f}%, job {state['job']}): not run "
            "again")
        return False
    if state["state"] in ("queued", "running"):
        log(f"[sweep] {task['name']}: job {state['job']} is {state['state']}: not submitted again")
        return False
    if state["state"] == "unknown":
        log(f"[sweep] {task['name']}: the state of job {state['job']} cannot be asked here (no sacct, or "
            "another machine's local job): not submitted again; rerun the sweep where it can be")
        return False
    if state["state"] in ("failed", "interrupted"):
        log(f"[sweep] {task['name']}: {state['state']} before ({state['error']}): runs again, resuming its "
            "run folder")
    return True


def _describe(task: dict) -> str:
    p = task["parameters"]
    what = (f"papermill notebooks/{task['notebook']}.ipynb {task['executed']}" if task["runner"] == "notebook"
            else "labkit train (labkit.lab.sweep.run_point, runner train)")
    return f"labkit sweep point {task['name']}: {what} " + " ".join(f"-p {k} {v}" for k, v in p.items())


# ------------------------------------------------------------------------------------------ launching
def _run_local(out: Path, tasks: list[dict], record: dict, parallel: int, log) -> None:
    """Jobs as processes here, ``parallel`` at a time; their epoch lines go to ``log``; returns when all ended
    (Ctrl-C or any error first cancels the running ones)."""
    executor = local_executor(out / JOBS)
    pending, running = list(tasks), {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                task = pending.pop(0)
                outcome_file(out, task["name"]).unlink(missing_ok=True)
                job = executor.submit(run_point, task)
                add_job(record, task["name"], job.job_id, "local")
                write_record(out, record)
                what = _describe(task).split(": ", 1)[1]
                log(f"[sweep] {task['name']}: job {job.job_id} runs {what[:80]}...")
                running[task["name"]] = (job, LogTail(out / JOBS, job.job_id))
            time.sleep(POLL_LOCAL_S)
            for name, (job, tail) in list(running.items()):
                done = job.done()
                for line in tail.lines():
                    if not SUBMITIT_CHATTER.match(line):
                        log(f"  {name}  {line}")
                if done:
                    del running[name]
                    log(_ended(out, name, record))
    except BaseException:
        for job, _ in running.values():
            job.cancel()
        raise


def _ended(out: Path, name: str, record: dict) -> str:
    state = point_state(out, name, record["points"][name])
    if state["state"] == "finished":
        return f"[sweep] {name}: ok top-1 {state['top1']:.2f}%"
    return f"[sweep] {name}: {state['state']} ({state['error']})"


def _submit_slurm(out: Path, tasks: list[dict], record: dict, options: SlurmOptions, log) -> None:
    for task in tasks:
        executor = slurm_executor(out / JOBS, options, task["name"], _describe(task))
        outcome_file(out, task["name"]).unlink(missing_ok=True)
        job = executor.submit(run_point, task)
        add_job(record, task["name"], job.job_id, "slurm")
        write_record(out, record)
        log(f"[sweep] {task['name']}: Slurm job {job.job_id} ({job.paths.submission_file})")


def _write_scripts(out: Path, tasks: list[dict], options: SlurmOptions, log) -> Table:
    """``--dry-run``: each job's sbatch script in ``jobs/<point>.sbatch``, nothing submitted."""
    rows = []
    for task in tasks:
        path = out / JOBS / f"{task['name']}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sbatch_script(out / JOBS, options, task["name"], _describe(task)))
        rows.append({"run": task["name"], "script": str(path)})
        log(f"[sweep] {task['name']}: wrote {path} (not submitted)")
    return Table(rows, ["run", "script"], title=f"sweep {out}: {len(rows)} sbatch scripts (dry run)")


def _wait_slurm(out: Path, record: dict, log) -> None:
    seen: dict[str, str] = {}
    while True:
        table = status_table(out)
        for row in table.rows:
            if seen.get(row["run"]) != row["state"]:
                seen[row["run"]] = row["state"]
                log(f"[sweep] {row['run']}: {row['state']} (job {row['job']}, epochs {row['epochs']})")
        if not any(r["state"] in ("queued", "running") for r in table.rows):
            return  # (a job whose state Slurm does not tell, "unknown", is not waited for)
        time.sleep(POLL_SLURM_S)


# ------------------------------------------------------------------------------------------ results
def _results(out: Path, tasks: list[dict], record: dict, log) -> Table:
    """The results table of ``tasks``, written as ``results.csv`` and ``results.png``: one row per point, from
    its outcome, or its state and error when it has none (interrupted); with budget and uniform points, the
    paired table (plan vs uniform, same seed) as ``paired.csv``, also shown in ``log``."""
    rows = []
    for task in tasks:
        outcome = read_outcome(out, task["name"])
        if outcome is not None and outcome.get("parameters") == task["parameters"]:
            rows.append({k: v for k, v in outcome.items() if k != "parameters"})
            continue
        state = point_state(out, task["name"], record["points"][task["name"]])
        rows.append({**task["row"], "status": state["state"], "job": state["job"], "error": state["error"]})
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    title = f"sweep: {len(rows)} runs, {counts.get('ok', 0)} ok" + "".join(
        f", {n} {s}" for s, n in counts.items() if s != "ok")
    table = Table(rows, COLUMNS, title=title)
    table.to_csv(out / "results.csv")
    _plot(rows, out / "results.png")
    paired = paired_table(out)  # budget plans against the uniform run of the same seed
    if paired.rows:
        paired.to_csv(out / "paired.csv")
        log(str(paired))
    return table


def results_figure(output_dir: str | Path) -> Figure:
    """The bar chart of a finished sweep's ``results.csv`` (final top-1 per run; failed runs in the title)."""
    path = resolve(output_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no sweep results in {path.parent}: run the sweep first (labkit sweep ... "
                                f"-o {output_dir})")
    with open(path, newline="") as f:
        rows = [dict(r, final_top1=float(r["final_top1"] or "nan")) for r in csv.DictReader(f)]
    return _figure(rows)


def _plot(rows: list[dict], path: Path) -> None:
    _figure(rows).savefig(path, dpi=100)


def _figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(max(4, 1.1 * len(rows) + 2), 3.5))
    ax = fig.subplots()
    ok = [r for r in rows if r["status"] == "ok"]
    bars = ax.bar([r["run"] for r in ok], [r["final_top1"] for r in ok], color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f")
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    ax.set(ylabel="final valid top-1 (%)",
           title="sweep" + (f" (not ok: {', '.join(failed)})" if failed else ""))
    ax.set_ylim(0, 105)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
