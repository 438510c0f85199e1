"""Sweeps through papermill: a 2x1 grid, a failing run reported with its notebook and cell, a budget point
(the proposed plan trained), grid validation."""

import csv
import json

import pytest
import torch

from labkit.cli import main
from labkit.config.loading import load_config
from labkit.lab.sweep import SweepError, expand_grid, results_figure, run_name, run_sweep
from labkit.precision.bitplan import BitPlan
from labkit.train.build import build_float_network
from labkit.train.checkpoint import make_checkpoint, save_atomic

from helpers import ROOT


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


def test_budgets_in_the_grid():
    points = expand_grid({"algorithm": "pact.4b", "bits": [3], "budget": ["weight_bytes=uniform:3, act_bytes=uniform:3",
                                                                          {"BOPs": 2.5e8}], "seed": [0, 1]})
    assert points == [{"algorithm": "pact.4b", "bits": 3, "seed": 0}, {"algorithm": "pact.4b", "bits": 3, "seed": 1},
                      {"algorithm": "pact.4b", "budget": "weight_bytes=uniform:3,act_bytes=uniform:3", "seed": 0},
                      {"algorithm": "pact.4b", "budget": "weight_bytes=uniform:3,act_bytes=uniform:3", "seed": 1},
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
    with pytest.raises(SweepError, match=r"no config .*config\.nope\.json for sweep algorithm 'nope': choose one of"):
        run_sweep({"algorithm": ["pact", "nope"], "bits": [8]}, tmp_path / "sweep", epochs=1)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_two_by_one_sweep_names_its_configs(tmp_path):
    out = tmp_path / "sweep"
    logs = []
    table = run_sweep({"algorithm": ["pact", "tqt"], "bits": [8]}, out, epochs=1, log=logs.append)
    rows = {r["run"]: r for r in table.rows}
    assert [rows[n]["status"] for n in ("pact-w8a8-s0", "tqt-w8a8-s0")] == ["ok", "ok"]
    for name, algorithm in (("pact-w8a8-s0", "pact"), ("tqt-w8a8-s0", "tqt")):
        assert (out / f"{name}.ipynb").is_file() and 0 <= rows[name]["final_top1"] <= 100
        assert (out / name / "history.jsonl").is_file()
        assert rows[name]["config"] == str(ROOT / "configs" / "embedded" / f"config.{algorithm}.json")
    with open(out / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["status"] for r in saved] == ["ok", "ok"] and [r["config"] for r in saved] == \
        [rows[n]["config"] for n in ("pact-w8a8-s0", "tqt-w8a8-s0")]
    assert any("tqt-w8a8-s0: running 04_tqt_training.ipynb" in line for line in logs)
    assert any("pact-w8a8-s0: running 03_pact_training.ipynb" in line for line in logs)
    assert sum("epoch   1/1  lr" in line for line in logs) == 2  # one console line per epoch of each run (not
    # the lines of an FP32 run trained first when missing: "epoch   1/12  lr")
    assert (out / "results.png").stat().st_size > 1000
    ax = results_figure(out).axes[0]
    assert [round(b.get_height(), 2) for b in ax.patches] == [round(float(r["final_top1"]), 2) for r in saved]


@pytest.mark.slow
def test_failing_cell_is_reported_with_notebook_and_cell(tmp_path):
    out = tmp_path / "sweep"
    table = run_sweep({"algorithm": ["pact"], "bits": [8]}, out, epochs=1, data="imagenet",
                      data_root=str(tmp_path / "no-imagenet"))
    row = table.rows[0]
    assert row["status"] == "failed" and row["error"].startswith("cell ")
    assert "mnv2_1.0.ckpt" in row["error"]  # the ImageNet config's pretrained checkpoint is missing here
    assert (out / "pact-w8a8-s0.ipynb").is_file()


@pytest.mark.slow
def test_a_budget_point_trains_the_proposed_plan(tmp_path):
    cfg = load_config("configs/embedded/config.pact.4b.json", check_files=False)
    torch.manual_seed(0)
    fp32 = tmp_path / "fp32" / "best.ckpt"
    save_atomic(make_checkpoint(build_float_network(cfg).state_dict(), {}), fp32)  # random float weights
    out = tmp_path / "sweep"
    table = run_sweep({"algorithm": "pact.4b", "budget": ["weight_bytes=uniform:3,act_bytes=uniform:3"]}, out,
                      epochs=1, pretrained=str(fp32), plan_bits=(2, 8), calib=4)
    row = table.rows[0]
    assert row["status"] == "ok", row["error"]
    plan_file = out / "plans" / "pact.4b-weight_bytes-u3_act_bytes-u3.json"
    assert row["config"] == str(plan_file) and (fp32.parent / "sensitivity.json").is_file()
    assert json.loads(plan_file.read_text())["description"].startswith("Proposed mixed precision")
    trained = json.loads((out / row["run"] / "config.json").read_text())
    plan = BitPlan.from_config({**trained, "network": {**trained["network"], "pretrained": None}})
    assert set(plan.w_bits.values()) <= {2, 8} and row["weight_bytes"] == plan.totals()["weight_bytes"]
    uniform = BitPlan.from_config(cfg)
    uniform.set_all(3, 3)
    assert row["weight_bytes"] <= uniform.totals()["weight_bytes"] and row["act_bytes"] <= uniform.totals()["act_bytes"]
