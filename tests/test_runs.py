"""The run folder owns its integrity: one writer, no silent overwrite or mix, provenance, repair after a
kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from labkit.config.loading import load_config
from labkit.lab.steps import run_config
from labkit.train.checkpoint import load_file, save_atomic
from labkit.train.loop import train
from labkit.train.runs import RunError, RunFolder, load_run, read_history

from helpers import QUIET, EMBEDDED_FP32, ROOT, tiny_overrides

PACT = ROOT / "configs" / "embedded" / "config.pact.json"


def tiny(**extra):
    return load_config(EMBEDDED_FP32, tiny_overrides(**{"data.train.dataset.limit": 128,
                                                        "data.valid.dataset.limit": 60,
                                                        **extra}))


def test_provenance_is_recorded_per_session(tmp_path, capsys):
    cfg = tiny(**{"training.n_epochs": 1})
    train(cfg, tmp_path / "run", **QUIET, parameters={"epochs": 1})
    train(tiny(**{"training.n_epochs": 2}), tmp_path / "run", resume=True, **QUIET)
    entries = RunFolder(tmp_path / "run").provenance()
    assert (
        len(entries) == 2
        and entries[0]["parameters"] == {"epochs": 1}
        and entries[1]["resumed_at_epoch"] == 1
    )
    for e in entries:
        assert (
            e["torch"] == torch.__version__ and e["device"] == "cpu" and len(e["data_sha256"]) == 64 * 2 + 1
        )
    assert entries[0]["config_sha256"] != entries[1]["config_sha256"]  # n_epochs changed: 1 -> 2
    assert entries[0]["data_sha256"] == entries[1]["data_sha256"]
    assert entries[0]["git"] is None or len(entries[0]["git"].split("+")[0]) == 40
    from labkit.cli import main

    assert main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("  trained ") == 2 and entries[0]["config_sha256"][:12] in out
    assert out.count("resumed at epoch 1") == 1


def test_resume_extends_a_hand_schedule_exactly(tmp_path):
    """A longer n_epochs on resume (a schedule that allows it) gives the run a longer run would have given."""
    train(tiny(**{"training.n_epochs": 3}), tmp_path / "long", **QUIET)
    train(tiny(**{"training.n_epochs": 2}), tmp_path / "ext", **QUIET)
    train(tiny(**{"training.n_epochs": 3}), tmp_path / "ext", resume=True, **QUIET)
    a, b = (load_file(tmp_path / n / "last.ckpt")["state_dict"] for n in ("long", "ext"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_with_its_config_trains_nothing(tmp_path):
    cfg = tiny(**{"training.n_epochs": 1})
    train(cfg, tmp_path / "run", **QUIET)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    result = train(cfg, tmp_path / "run", resume=True, **QUIET)
    assert result["epoch"] == 0 and result["valid"] == read_history(tmp_path / "run")[0]["valid"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_resume_accepts_the_same_file_spelled_another_way(tmp_path, monkeypatch):
    """A run trained from the project root with a relative ``network.pretrained`` resumes from a notebook that
    spells the same file absolute; another file is still a difference."""
    train(tiny(**{"training.n_epochs": 1}), tmp_path / "fp32", **QUIET)
    (tmp_path / "other.ckpt").write_bytes((tmp_path / "fp32" / "best.ckpt").read_bytes())
    monkeypatch.chdir(tmp_path)
    relative = tiny(**{"training.n_epochs": 1, "network.pretrained": "fp32/best.ckpt"})
    assert relative["network"]["pretrained"] == str(tmp_path / "fp32" / "best.ckpt")  # recorded absolute
    train(relative, tmp_path / "run", **QUIET)
    monkeypatch.chdir(ROOT)
    absolute = tiny(**{"training.n_epochs": 1, "network.pretrained": str(tmp_path / "fp32" / "best.ckpt")})
    monkeypatch.chdir(tmp_path)
    assert train(absolute, tmp_path / "run", resume=True, **QUIET)["epoch"] == 0
    other = tiny(**{"training.n_epochs": 1, "network.pretrained": str(tmp_path / "other.ckpt")})
    with pytest.raises(RunError, match="differs from the run's in 'network.pretrained'"):
        train(other, tmp_path / "run", resume=True, **QUIET)


def test_overwrite_replaces_the_run(tmp_path):
    train(tiny(**{"training.n_epochs": 2}), tmp_path / "run", **QUIET)
    train(tiny(**{"training.n_epochs": 1}), tmp_path / "run", overwrite=True, **QUIET)
    assert [r["epoch"] for r in read_history(tmp_path / "run")] == [0]
    assert len(RunFolder(tmp_path / "run").provenance()) == 1
    assert load_file(tmp_path / "run" / "last.ckpt")["epoch"] == 0


KILLER = """
import os, shutil, signal, sys
import torch
torch.set_num_threads({threads})  # the parent's: the resumed run must be the uninterrupted one bit for bit
import labkit.train.runs
from labkit.config.loading import load_config
from labkit.train.loop import train
sys.path.insert(0, {tests!r})
from helpers import QUIET, tiny_overrides

real = shutil.copyfile
def copy_then_die(src, dst, *a, **k):  # SIGKILL halfway through the best.ckpt copy of epoch 2
    if str(dst).endswith(".best.ckpt.copy.tmp") and labkit.train.runs.load_file(src)["epoch"] == 1:
        with open(dst, "wb") as f:
            f.write(open(src, "rb").read()[:1000])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
labkit.train.runs.shutil.copyfile = copy_then_die
overrides = {{**tiny_overrides(), "data.train.dataset.limit": 128, "data.valid.dataset.limit": 60,
             "training.n_epochs": 3}}
train(load_config({config!r}, overrides), {out!r}, **QUIET)
"""


def test_kill_during_best_checkpoint_write_is_repaired_on_resume(tmp_path):
    out = tmp_path / "run"
    script = KILLER.format(tests=str(ROOT / "tests"), config=str(EMBEDDED_FP32), out=str(out),
                           threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(out.glob(".*.tmp")), "the kill left the temporary file of the best.ckpt write"
    history = read_history(out)
    assert (
        load_file(out / "last.ckpt")["epoch"] == 1
        and history[1]["valid"]["top1"] >= history[0]["valid"]["top1"]
    )
    assert load_file(out / "best.ckpt")["epoch"] == 0  # one epoch behind
    cfg = tiny(**{"training.n_epochs": 3})
    train(cfg, out, resume=True, **QUIET)
    assert not list(out.glob(".*.tmp"))
    history = read_history(out)
    best_epoch = max(history, key=lambda r: (r["valid"]["top1"], r["epoch"]))["epoch"]
    assert load_file(out / "best.ckpt")["epoch"] == best_epoch
    assert oct((out / "best.ckpt").stat().st_mode & 0o777) == oct(
        (out / "config.json").stat().st_mode & 0o777
    )
    # and the resumed run is the uninterrupted one
    train(cfg, tmp_path / "whole", **QUIET)
    a, b = (load_file(p / "last.ckpt")["state_dict"] for p in (out, tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_into_one_folder(tmp_path):
    """The issue's item 1: a second ``labkit train`` into a folder being written is refused at once."""
    cfg = tmp_path / "cfg.json"
    raw = json.loads(EMBEDDED_FP32.read_text())
    raw["training"]["n_epochs"] = 3
    raw["data"]["train"]["dataset"]["limit"] = 256
    cfg.write_text(json.dumps(raw))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "labkit.cli", "train", str(cfg), "-o", str(out),
                              "--no-progress"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    holder = out / ".lock.pid"  # filelock's .lock is empty; the holder's pid is written beside it
    while time.time() < deadline and not (holder.is_file() and holder.read_text().strip()):
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "labkit.cli", "train", str(cfg), "-o", str(out),
                             "--resume"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr, second.stderr
    assert first.wait(timeout=900) == 0, first.stderr.read()
    assert [r["epoch"] for r in read_history(out)] == [0, 1, 2] and len(RunFolder(out).provenance()) == 1


def test_bit_overrides_edit_the_config_and_keep_every_other_key(tmp_path):
    """The issue's item 7 through the notebooks' path (lab.run_config), which sweeps and notebooks use."""
    raw = json.loads(PACT.read_text())
    raw["network"]["quantize"]["PACTUnsignedAct"]["kwargs"]["init_clip"] = "percentile"
    raw["network"]["quantize"]["harmonize"]["requant_pool"] = False
    raw["network"]["pretrained"] = None
    path = tmp_path / "config.custom.json"
    path.write_text(json.dumps(raw))
    same = run_config(str(path), w_bits=8, a_bits=8)
    q = same["network"]["quantize"]
    assert (
        q["PACTUnsignedAct"]["kwargs"]["init_clip"] == "percentile"
        and q["harmonize"]["requant_pool"] is False
    )
    assert {k: v for k, v in same.items() if k != "name"} == {k: v for k,
                                                              v in load_config(path).items() if k != "name"}
    low = run_config(str(path), w_bits=4)  # weights only: activations keep their 8 bits
    modules = dict(load_run_net(low).named_modules())
    assert modules["pilot.0"].n_levels == 16 and modules["pilot.2"].n_levels == 256
    assert modules["features.2.integer_add"].n_levels == 256 and "avgpool_act" not in modules
    with pytest.raises(ValueError, match="0 is not a bit-width from 2 to 16"):
        run_config(str(path), w_bits=0)


def load_run_net(cfg):
    from labkit.train.build import build_network

    return build_network(cfg, pretrained=False)[0]


def test_load_run_falls_back_to_last_when_best_predates_the_quantizers(tmp_path):
    fp32 = tmp_path / "fp32"
    train(tiny(**{"training.n_epochs": 1}), fp32, **QUIET)
    cfg = load_config(PACT, {**tiny_overrides(), "network.pretrained": str(fp32 / "best.ckpt"),
                             "training.n_epochs": 2,
                             "data.train.dataset.limit": 128, "data.valid.dataset.limit": 60,
                             "training.quantize.kwargs.schedules.activation": {"1": "start"}})
    train(cfg, tmp_path / "pact", **QUIET)
    run = tmp_path / "pact"
    assert load_run(run, "last").path.name == "last.ckpt"
    # as if the best epoch had been epoch 0, before the activations started
    early = load_file(run / "last.ckpt")
    early["state_dict"] = {
        k: torch.zeros_like(v) if k.endswith("started_flag") and ".acts" not in k and "act" in k else v
        for k, v in early["state_dict"].items()
    }
    save_atomic(early, run / "best.ckpt")
    with pytest.warns(UserWarning, match="before every quantizer had started"):
        assert load_run(run).path.name == "last.ckpt"
    with pytest.raises(RunError, match="holds no best.ckpt"):
        load_run(tmp_path)


def test_a_full_disk_during_a_checkpoint_write_loses_nothing_and_resumes_exactly(tmp_path, monkeypatch):
    """The second epoch's checkpoint write fails as on a full disk: one RunError line naming the file and the
    fix; the first epoch's files stay intact; --resume then reaches the uninterrupted run's weights."""
    import errno

    import labkit.train.checkpoint as checkpoint

    cfg = tiny(**{"training.n_epochs": 2})
    train(cfg, tmp_path / "whole", **QUIET)
    calls, real_save = [], torch.save

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(RunError, match=r"cannot write '.*last\.ckpt' \(No space left on device\): the disk "
                                       r"is full"):
        train(cfg, tmp_path / "run", **QUIET)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    folder = RunFolder(tmp_path / "run")
    assert load_file(folder.checkpoint("last"))["epoch"] == 0 and not list((tmp_path / "run").glob(".*.tmp"))
    train(cfg, tmp_path / "run", resume=True, **QUIET)
    a, b = (load_file(tmp_path / n / "last.ckpt")["state_dict"] for n in ("whole", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_start_that_finishes_no_epoch_leaves_no_provenance_entry(tmp_path, monkeypatch):
    import labkit.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(**{"training.n_epochs": 1}), tmp_path / "run", **QUIET)
    assert RunFolder(tmp_path / "run").provenance() == []
    monkeypatch.undo()
    train(tiny(**{"training.n_epochs": 1}), tmp_path / "run", resume=True, **QUIET)
    assert len(RunFolder(tmp_path / "run").provenance()) == 1


def test_a_damaged_history_line_is_named_by_its_number(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, \n')
    with pytest.raises(RunError, match=r"history\.jsonl' is damaged at line 3"):
        RunFolder(tmp_path).history()


def test_relative_paths_name_the_project_root_from_any_folder(tmp_path, monkeypatch):
    """A relative network.pretrained that does not exist yet resolves under the project root, from the root or
    from notebooks/, and the resolved config records it absolute."""
    for cwd in (ROOT, ROOT / "notebooks", tmp_path):
        monkeypatch.chdir(cwd)
        cfg = load_config(ROOT / "configs" / "embedded" / "config.pact.json",
                          {"network.pretrained": "runs/not-yet/best.ckpt"}, check_files=False)
        assert cfg["network"]["pretrained"] == str(ROOT / "runs" / "not-yet" / "best.ckpt")


def test_damaged_run_files_are_named_on_read(tmp_path):
    """A provenance.json of the wrong shape, a last.ckpt that is no training checkpoint: one line each."""
    from labkit.config.errors import CheckpointError

    cfg = tiny(**{"training.n_epochs": 1})
    train(cfg, tmp_path / "run", **QUIET)
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run" / "provenance.json").write_text('{"time": "now"}')
    with pytest.raises(RunError, match=r"provenance\.json' holds dict, not a JSON list"):
        folder.provenance()
    save_atomic({"state_dict": {}}, folder.checkpoint("last"))
    with pytest.raises(CheckpointError, match=r"last\.ckpt' is no training checkpoint of labkit \(it lacks "
                                              r"epoch"):
        train(tiny(**{"training.n_epochs": 2}), tmp_path / "run", resume=True, **QUIET)
