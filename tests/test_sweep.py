"""Sweeps: the grid, every point checked before any runs, jobs through submitit's local executor (a point
killed mid-run is resumed by the rerun, a finished one is not run again, a failing one is reported), each
point's state, and the sbatch script of a Slurm job as text."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

import labkit.lab.sweep as sweep_module
from labkit.cli import main
from labkit.config.loading import load_config, set_key
from labkit.lab.launchers import LauncherError, SlurmOptions, parse_time
from labkit.lab.sweep import SweepError, expand_grid, results_figure, run_name, run_sweep
from labkit.lab.sweep_jobs import add_job, read_record, status_table, write_outcome, write_record
from labkit.precision.bitplan import BitPlan
from labkit.train.build import build_float_network
from labkit.train.checkpoint import load_file, make_checkpoint, save_atomic
from labkit.train.loop import train
from labkit.train.runs import read_history

from helpers import ROOT, tiny_overrides

#: per point: 64 training images in 4 batches, 32 to validate
TINY = tiny_overrides(**{"data.train.dataset.limit": 64, "data.valid.dataset.limit": 32,
                         "data.train.dataloader.bs": 16})


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    """config.{pact,tqt,pact.4b,diverge}.json: the embedded ones on a few images, from random FP32 weights;
    ``diverge`` is PACT at a learning rate of 1e12 (its loss turns NaN in the first epoch)."""
    folder = tmp_path_factory.mktemp("configs")
    fp32 = folder / "fp32.ckpt"
    torch.manual_seed(0)
    base = load_config(ROOT / "configs" / "embedded" / "config.fp32.json")
    save_atomic(make_checkpoint(build_float_network(base).state_dict(), {}), fp32)
    for name, source, extra in (("pact", "pact", {}), ("tqt", "tqt", {}), ("pact.4b", "pact.4b", {}),
                                ("diverge", "pact", {"training.gd.opt.kwargs.lr": 1e12})):
        cfg = json.loads((ROOT / "configs" / "embedded" / f"config.{source}.json").read_text())
        for key, value in {**TINY, "network.pretrained": str(fp32), **extra}.items():
            set_key(cfg, key, value)
        (folder / f"config.{name}.json").write_text(json.dumps(cfg))
    return folder


def test_expand_grid_and_validation():
    points = expand_grid({"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0, 1]})
    assert len(points) == 8 and points[0] == {"algorithm": "pact", "bits": 8, "seed": 0}
    assert expand_grid({"algorithm": "pact", "bits": 4}) == [{"algorithm": "pact", "bits": 4, "seed": 0}]
    assert run_name(points[-1]) == "tqt-w4a4-s1"
    with pytest.raises(ValueError, match="unknown sweep key"):
        expand_grid({"algorithm": ["pact"], "bits": [8], "lr": [0.1]})
    with pytest.raises(ValueError, match="bits 1"):
        expand_grid({"algorithm": ["pact"], "bits": [1]})
    with pytest.raises(ValueError, match="at least one 'bits'"):
        expand_grid({"algorithm": ["pact"]})
    for seed in ("zero", -1, 2 ** 32, 1.5, True):
        with pytest.raises(SweepError, match=r"sweep seed .*: use integers from 0 to 4294967295"):
            expand_grid({"algorithm": ["pact"], "bits": [8], "seed": [0, seed]})


def test_budgets_in_the_grid():
    points = expand_grid({"algorithm": "pact.4b", "bits": [3], "seed": [0, 1],
                          "budget": ["weight_bytes=uniform:3, act_bytes=uniform:3", {"BOPs": 2.5e8}]})
    both = "weight_bytes=uniform:3,act_bytes=uniform:3"
    assert points == [{"algorithm": "pact.4b", "bits": 3, "seed": 0},
                      {"algorithm": "pact.4b", "bits": 3, "seed": 1},
                      {"algorithm": "pact.4b", "budget": both, "seed": 0},
                      {"algorithm": "pact.4b", "budget": both, "seed": 1},
                      {"algorithm": "pact.4b", "budget": "BOPs=250000000", "seed": 0},
                      {"algorithm": "pact.4b", "budget": "BOPs=250000000", "seed": 1}]
    assert run_name(points[2]) == "pact.4b-weight_bytes-u3_act_bytes-u3-s0"
    assert expand_grid({"algorithm": "pact", "budget": "BOPs=uniform:4"}) == [
        {"algorithm": "pact", "budget": "BOPs=uniform:4", "seed": 0}]
    with pytest.raises(ValueError, match="budget metric 'bops' is unknown"):
        expand_grid({"algorithm": "pact", "budget": ["bops=uniform:4"]})


def test_cli_sweep_refuses_a_bad_budget_before_it_starts(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--algorithms", "pact.4b", "--budgets", "BOPs=uniform:3", "weight_bytes=-1", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "budget weight_bytes=-1 is not a limit" in err and err.count("\n") == 1 and not out.exists()


def test_an_algorithm_without_config_is_refused_before_any_run(tmp_path):
    with pytest.raises(SweepError, match=r"no config .*config\.nope\.json for sweep algorithm 'nope': "):
        run_sweep({"algorithm": ["pact", "nope"], "bits": [8]}, tmp_path / "sweep", epochs=1)
    assert not (tmp_path / "sweep").exists()


def test_every_point_is_checked_before_the_first_runs(tiny_configs, tmp_path):
    """The point that cannot run is named, with the fix, before any point starts: nothing is written."""
    out = tmp_path / "sweep"
    cases = [
        ({"algorithm": ["pact", "pact.4b"], "bits": [8, 16]}, {},
         r"sweep point pact\.4b-w16a16-s0: bits 16: the weights of 'pilot.0' \(and 52 more\) start by SAWB, "
         r"whose coefficients stop at 8 bits"),
        ({"algorithm": ["pact.4b"], "bits": [4], "budget": ["weight_bytes=1000"]}, {},
         r"sweep point pact\.4b-weight_bytes-1000-s0: budget weight_bytes <= 1,000 cannot be met: even every "
         r"layer at 2 bits costs [\d,]+; raise the budget"),
        ({"algorithm": ["pact.4b"], "budget": ["weight_bytes=uniform:3"]}, {"plan_bits": (2, 4, 16)},
         r"sweep point pact\.4b-weight_bytes-u3-s0: --plan-bits 16: the weights of 'pilot.0'"),
        ({"algorithm": ["pact"], "bits": [8]}, {"epochs": 0},
         r"--epochs 0: every point trains at least one epoch"),
        ({"algorithm": ["pact"], "bits": [8]}, {"launcher": "slurm", "slurm": {"gpus": 2}},
         r"--gpus 2 with the notebook runner would train on one GPU: use --runner train"),
        ({"algorithm": ["pact"], "bits": [8], "slurm": {"partition": "gpu"}}, {},
         r"Slurm options with --launcher local: they apply to --launcher slurm only"),
    ]
    for grid, kwargs, pattern in cases:
        with pytest.raises(SweepError, match=pattern):
            run_sweep(grid, out, **{"epochs": 1, "configs": tiny_configs, "device": "cpu", **kwargs})
        assert not out.exists()
    imagenet = {"data": "imagenet", "data_root": str(tmp_path / "none")}
    one = {"algorithm": ["pact"], "bits": [8]}
    with pytest.raises(SweepError, match=r"sweep point pact-w8a8-s0: network.pretrained "
                                         r"'.*/pretrained/mnv2_1.0.ckpt' not found: convert torchvision"):
        run_sweep(one, out, **imagenet)
    with pytest.raises(SweepError, match=r"sweep point pact-w8a8-s0: ImageNet root '.*none' does not exist"):
        run_sweep(one, out, **imagenet, pretrained=str(tiny_configs / "fp32.ckpt"))
    assert not out.exists()


def test_slurm_options():
    section = {"partition": "gpu", "time": "2-00:00:00", "sbatch": {"account": "lab"},
               "setup": ["module load cuda"]}
    options = SlurmOptions.from_section(section, gpus=4, sbatch=["qos=high", "exclusive"],
                                        setup=["source venv/bin/activate"])
    assert options == SlurmOptions(partition="gpu", gpus=4, time=2880,
                                   sbatch={"account": "lab", "qos": "high", "exclusive": True},
                                   setup=("module load cuda", "source venv/bin/activate"))
    assert options.tasks() == 4 and SlurmOptions(gpus=0).tasks() == 1
    assert [parse_time(t) for t in (90, "90", "1:30", "12:00:00", "2-12", "2-12:30", "0-0:0:30")] == \
        [90, 90, 2, 720, 3600, 3630, 1]
    for section, pattern in (({"partitoin": "gpu"}, r"slurm option 'partitoin' is unknown \(did you mean "
                                                    r"'partition'\?\)"),
                             ({"time": "0"}, r"slurm time '0' is under a minute"),
                             ({"time": "12h"}, r"slurm time '12h' is not a time limit"),
                             ({"gpus": -1}, r"slurm gpus -1: give an integer >= 0"),
                             ({"sbatch": ["time=60"]},
                              r"sbatch option 'time' is set by the sweep: use --partition, --gpus or --time"),
                             ({"sbatch": ["two words=1"]}, r"sbatch option 'two words' is not an option")):
        with pytest.raises(LauncherError, match=pattern):
            SlurmOptions.from_section(section)


def test_slurm_job_script_as_text(tiny_configs, tmp_path):
    """--launcher slurm --dry-run writes, per point, the sbatch script submitit would submit (no cluster)."""
    out = tmp_path / "sweep"
    options = {"partition": "gpu", "gpus": 1, "time": "12:00:00", "sbatch": ["account=lab"],
               "setup": ["source ~/venv/bin/activate"]}
    table = run_sweep({"algorithm": ["pact", "tqt"], "bits": [8], "seed": [3]}, out, epochs=5,
                      configs=tiny_configs, launcher="slurm", slurm=options, dry_run=True,
                      log=lambda line: None)
    assert [r["run"] for r in table.rows] == ["pact-w8a8-s3", "tqt-w8a8-s3"]
    script = (out / "jobs" / "tqt-w8a8-s3.sbatch").read_text()
    lines = script.splitlines()
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=720", "--account=lab",
                 "--job-name=tqt-w8a8-s3", f"--output={out / 'jobs'}/%j_0_log.out"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "source ~/venv/bin/activate" in lines
    note = next(line for line in lines if line.startswith("# labkit sweep point tqt-w8a8-s3: "))
    assert f"papermill notebooks/04_tqt_training.ipynb {out / 'tqt-w8a8-s3.ipynb'}" in note
    config = tiny_configs / "config.tqt.json"
    assert f"-p config {config} -p w_bits 8 -p a_bits 8 -p seed 3 -p epochs 5" in note
    jobs = out / "jobs"
    assert lines[-1] == f"srun --unbuffered --output {jobs}/%j_%t_log.out --error {jobs}/%j_%t_log.err " \
                        f"{sys.executable} -u -m submitit.core._submit {jobs}"
    ddp = run_sweep({"algorithm": ["pact"], "bits": [8]}, tmp_path / "ddp", configs=tiny_configs,
                    launcher="slurm", slurm={"gpus": 4}, runner="train", dry_run=True, log=lambda line: None)
    script = Path(ddp.rows[0]["script"]).read_text()
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --partition" not in script and "runner train" in script


def test_cli_gpus_zero_writes_a_cpu_job(tiny_configs, tmp_path, capsys):
    """``--gpus 0`` is a value (a CPU job), not an absent flag: the script asks for no GPU."""
    from labkit.cli import main

    out = tmp_path / "cpu"
    assert main(["sweep", "--configs", str(tiny_configs), "--algorithms", "pact", "--bits", "8", "--launcher",
                 "slurm", "--gpus", "0", "--dry-run", "-o", str(out)]) == 0
    script = (out / "jobs" / "pact-w8a8-s0.sbatch").read_text()
    assert "--gpus" not in script and "--gres" not in script and "#SBATCH --ntasks-per-node=1" in script


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_state_of_every_point(tmp_path, capsys):
    """finished (top-1), failed (error), interrupted (a job that ended without an outcome: its stderr's last
    error), running (a live job), not started, unknown (a Slurm job without Slurm here); an outcome of other
    parameters does not count."""
    out = tmp_path / "sweep"
    (out / "jobs").mkdir(parents=True)
    names = ["ok", "bad", "killed", "live", "later", "changed", "cluster"]
    record = {"launcher": "local", "pid": None, "host": "", "points": {
        n: {"run_dir": str(out / n), "parameters": {"epochs": 3, "seed": 0}, "jobs": []} for n in names}}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local",
                             str(out / "jobs")])
    try:
        for name, job in (("ok", "11"), ("bad", "12"), ("killed", str(_dead_pid())), ("live", str(live.pid)),
                          ("changed", "14")):
            add_job(record, name, job, "local")
        add_job(record, "cluster", "4242", "slurm")
        write_record(out, record)
        asked = {"epochs": 3, "seed": 0}
        write_outcome(out, "ok", {"status": "ok", "final_top1": 91.5, "job": "11", "parameters": asked})
        write_outcome(out, "bad", {"status": "failed", "error": "cell 4: NonFiniteError: loss became nan",
                                   "job": "12", "parameters": asked})
        write_outcome(out, "changed", {"status": "ok", "final_top1": 50.0,
                                       "parameters": {**asked, "epochs": 2}})
        killed = record["points"]["killed"]["jobs"][0]["id"]
        (out / "jobs" / f"{killed}_0_log.err").write_text("epoch 1\nTraceback (most recent call last):\n"
                                                          "KeyboardInterrupt\n\n")
        (out / "killed").mkdir()
        (out / "killed" / "history.jsonl").write_text('{"epoch": 0}\n')
        rows = {r["run"]: r for r in status_table(out).rows}
        assert main(["sweep", "--status", str(out)]) == 0
        printed = capsys.readouterr().out
    finally:
        live.kill()
        live.wait()
    assert {n: rows[n]["state"] for n in names} == {
        "ok": "finished", "bad": "failed", "killed": "interrupted", "live": "running", "later": "not started",
        "changed": "interrupted", "cluster": "unknown"}
    assert rows["ok"]["top1"] == 91.5 and rows["bad"]["error"] == "cell 4: NonFiniteError: loss became nan"
    assert rows["killed"]["error"] == f"job {killed} ended without an outcome (KeyboardInterrupt)"
    assert rows["killed"]["epochs"] == "1/3" and rows["live"]["job"] == str(live.pid)
    assert "7 points, 1 finished, 1 failed, 1 running, 2 interrupted, 1 not started, 1 unknown" in printed
    assert main(["sweep", "--status", str(tmp_path)]) == 2
    assert "holds no sweep (no sweep.json)" in capsys.readouterr().err


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (a job killed as a node failure or scancel would)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _events_equal_history(run: Path) -> bool:
    acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})
    acc.Reload()
    history = read_history(run)
    tags = acc.Tags()[SCALARS]

    def f32(x):
        return float(torch.tensor(x, dtype=torch.float32))

    top1 = [(e.step, e.value) for e in acc.Scalars("top1/valid")] if "top1/valid" in tags else []
    lr = [(e.step, e.value) for e in acc.Scalars("lr")] if "lr" in tags else []
    return top1 == [(r["epoch"] + 1, f32(r["valid"]["top1"])) for r in history] and \
        lr == [(r["epoch"] + 1, f32(r["lr"])) for r in history]


@pytest.mark.slow
def test_local_sweep_through_submitit_kill_resume_and_failure(tiny_configs, tmp_path, monkeypatch, capsys):
    """Three points as local submitit jobs: pact's job is killed (with its notebook kernel) after its first
    epoch, tqt finishes, diverge fails in its notebook. Rerunning the same command does not run tqt again,
    resumes pact to the weights of an uninterrupted run, reports diverge again and exits 1 naming it."""
    monkeypatch.setattr(sweep_module, "POLL_LOCAL_S", 0.1)  # the kill lands within the second epoch
    out = tmp_path / "sweep"
    grid = {"algorithm": ["pact", "tqt", "diverge"], "bits": [8]}
    logs, killed = [], []

    def log(line):
        logs.append(line)
        if not killed and line.startswith("  pact-w8a8-s0  ") and "epoch   1/2  lr" in line:
            job = read_record(out)["points"]["pact-w8a8-s0"]["jobs"][-1]["id"]
            _kill_tree(int(job))
            killed.append(job)

    table = run_sweep(grid, out, epochs=2, configs=tiny_configs, device="cpu", log=log)
    rows = {r["run"]: r for r in table.rows}
    assert killed and len(read_history(out / "pact-w8a8-s0")) == 1, "the kill came after pact's second epoch"
    assert [rows[n]["status"] for n in ("pact-w8a8-s0", "tqt-w8a8-s0", "diverge-w8a8-s0")] == \
        ["interrupted", "ok", "failed"]
    assert rows["pact-w8a8-s0"]["error"].startswith(f"job {killed[0]} ended without an outcome")
    assert rows["diverge-w8a8-s0"]["error"].startswith("cell ") and "NonFiniteError: " in \
        rows["diverge-w8a8-s0"]["error"] and "loss became nan at epoch 1" in rows["diverge-w8a8-s0"]["error"]
    assert rows["tqt-w8a8-s0"]["config"] == str(tiny_configs / "config.tqt.json")
    assert any("tqt-w8a8-s0: job" in line and "04_tqt_training.ipynb" in line for line in logs)
    assert sum("epoch   2/2  lr" in line for line in logs) == 1  # tqt's; the console has every job's epochs
    tqt_outcome = (out / "points" / "tqt-w8a8-s0.json").read_text()
    tqt_notebook = (out / "tqt-w8a8-s0.ipynb").stat().st_mtime_ns
    assert main(["sweep", "--status", str(out)]) == 0
    assert "3 points, 1 finished, 1 failed, 1 interrupted" in capsys.readouterr().out

    argv = ["sweep", "--configs", str(tiny_configs), "--algorithms", "pact", "tqt", "diverge", "--bits", "8",
            "--epochs", "2", "--device", "cpu", "-o", str(out)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    captured = capsys.readouterr()
    assert "tqt-w8a8-s0: finished (top-1" in captured.out and "not run again" in captured.out
    assert "labkit sweep: 1 of 3 points did not finish: diverge-w8a8-s0 failed (cell " in captured.err
    assert (out / "points" / "tqt-w8a8-s0.json").read_text() == tqt_outcome
    assert (out / "tqt-w8a8-s0.ipynb").stat().st_mtime_ns == tqt_notebook
    record = read_record(out)
    points = ("pact-w8a8-s0", "tqt-w8a8-s0", "diverge-w8a8-s0")
    assert [len(record["points"][n]["jobs"]) for n in points] == [2, 1, 2]
    with open(out / "results.csv") as f:
        saved = {r["run"]: r for r in csv.DictReader(f)}
    assert [saved[n]["status"] for n in points] == ["ok", "ok", "failed"]
    assert saved["pact-w8a8-s0"]["job"] == record["points"]["pact-w8a8-s0"]["jobs"][-1]["id"]
    ax = results_figure(out).axes[0]
    assert [round(b.get_height(), 2) for b in ax.patches] == \
        [round(float(saved[n]["final_top1"]), 2) for n in ("pact-w8a8-s0", "tqt-w8a8-s0")]

    _assert_resumed_like_uninterrupted(out / "pact-w8a8-s0", tmp_path / "uninterrupted")
    for name in points:
        assert _events_equal_history(out / name), name


def _assert_resumed_like_uninterrupted(run: Path, reference: Path) -> None:
    """``run`` was resumed once, at epoch 1, and holds the weights of its config trained without a break."""
    provenance = json.loads((run / "provenance.json").read_text())
    assert [p.get("resumed_at_epoch") for p in provenance] == [None, 1]
    train(json.loads((run / "config.json").read_text()), reference, progress=False, log=None, device="cpu")
    resumed = load_file(run / "last.ckpt")["state_dict"]
    whole = load_file(reference / "last.ckpt")["state_dict"]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert read_history(run)[-1]["valid"] == read_history(reference)[-1]["valid"]


@pytest.mark.slow
def test_the_train_runner_reaches_the_notebook_runners_weights(tiny_configs, tmp_path):
    """--runner train (what labkit train runs, in the job's process) trains what the notebook trains."""
    runs = {}
    for runner in ("notebook", "train"):
        table = run_sweep({"algorithm": ["tqt"], "bits": [4]}, tmp_path / runner, epochs=1,
                          configs=tiny_configs, device="cpu", runner=runner, log=lambda line: None)
        assert table.rows[0]["status"] == "ok", table.rows[0]["error"]
        runs[runner] = tmp_path / runner / "tqt-w4a4-s0"
    assert (tmp_path / "notebook" / "tqt-w4a4-s0.ipynb").is_file()
    assert not (tmp_path / "train" / "tqt-w4a4-s0.ipynb").exists()
    a, b = (load_file(runs[r] / "last.ckpt")["state_dict"] for r in ("notebook", "train"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_history(runs["notebook"])[-1]["valid"] == read_history(runs["train"])[-1]["valid"]


@pytest.mark.slow
def test_a_budget_point_trains_the_proposed_plan(tiny_configs, tmp_path):
    out = tmp_path / "sweep"
    table = run_sweep({"algorithm": "pact.4b", "budget": ["weight_bytes=uniform:3,act_bytes=uniform:3"]}, out,
                      epochs=1, configs=tiny_configs, device="cpu", plan_bits=(2, 8), calib=4)
    row = table.rows[0]
    assert row["status"] == "ok", row["error"]
    plan_file = out / "plans" / "pact.4b-weight_bytes-u3_act_bytes-u3.json"
    assert row["config"] == str(plan_file) and (tiny_configs / "sensitivity.json").is_file()
    assert json.loads(plan_file.read_text())["description"].startswith("Proposed mixed precision")
    trained = json.loads((out / row["run"] / "config.json").read_text())
    plan = BitPlan.from_config({**trained, "network": {**trained["network"], "pretrained": None}})
    assert set(plan.w_bits.values()) <= {2, 8} and row["weight_bytes"] == plan.totals()["weight_bytes"]
    cfg = load_config(tiny_configs / "config.pact.4b.json")
    uniform = BitPlan.from_config(cfg)
    uniform.set_all(3, 3)
    assert row["weight_bytes"] <= uniform.totals()["weight_bytes"] and \
        row["act_bytes"] <= uniform.totals()["act_bytes"]
