"""Sweeps through papermill: a 2x1 grid, a failing run reported with its notebook and cell, grid validation."""

import csv

import pytest

from labkit.sweep import expand_grid, run_name, run_sweep


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


@pytest.mark.slow
def test_two_by_one_sweep_and_failures_reported(tmp_path):
    out = tmp_path / "sweep"
    logs = []
    table = run_sweep({"algorithm": ["pact", "tqt", "nope"], "bits": [8]}, out, epochs=1, log=logs.append)
    rows = {r["run"]: r for r in table.rows}
    assert [rows[n]["status"] for n in ("pact-w8a8-s0", "tqt-w8a8-s0")] == ["ok", "ok"]
    for name in ("pact-w8a8-s0", "tqt-w8a8-s0"):
        assert (out / f"{name}.ipynb").is_file() and 0 <= rows[name]["final_top1"] <= 100
        assert (out / name / "history.jsonl").is_file()
    assert rows["nope-w8a8-s0"]["status"] == "failed" and "config.nope.json" in rows["nope-w8a8-s0"]["error"]
    with open(out / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["status"] for r in saved] == ["ok", "ok", "failed"]
    assert (out / "results.png").stat().st_size > 1000
    assert any("failed" in line for line in logs)


@pytest.mark.slow
def test_failing_cell_is_reported_with_notebook_and_cell(tmp_path):
    out = tmp_path / "sweep"
    table = run_sweep({"algorithm": ["pact"], "bits": [8]}, out, epochs=1, data="imagenet",
                      data_root=str(tmp_path / "no-imagenet"))
    row = table.rows[0]
    assert row["status"] == "failed" and row["error"].startswith("cell ")
    assert "mnv2_1.0.ckpt" in row["error"]  # the ImageNet config's pretrained checkpoint is missing here
    assert (out / "pact-w8a8-s0.ipynb").is_file()
