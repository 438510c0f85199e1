"""Notebooks: committed without outputs, a papermill parameters cell, and runs with non-default parameters.

nbval (``pytest --nbval-lax notebooks``) runs them top to bottom with their defaults in CI as well.
"""

import json
import re
from pathlib import Path

import pytest

from labkit.config.loading import load_config
from labkit.lab.notebooks import CONSOLE_LINE

from helpers import EMBEDDED_FP32

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_with_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def run_notebook(name, tmp_path, **parameters):
    """Execute a notebook through labkit's papermill wrapper; check it is quiet; return its text."""
    from labkit.lab.notebooks import execute_notebook

    nb = json.loads(execute_notebook(name.removesuffix(".ipynb"), tmp_path / name, parameters).read_text())
    assert_quiet(nb)
    return output_text(nb)


def assert_quiet(nb) -> None:
    """No stderr output (kernel warnings, tracebacks), no bare figure or object reprs, no tqdm fallback
    text."""
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            assert out.get("name") != "stderr", f"cell {i} wrote to stderr: {text[:300]}"
            assert not re.search(r"<Figure size|<\w+(\.\w+)+ (object )?at 0x|\|\s+\| 0/\d+", text), \
                f"cell {i} shows a bare repr or a progress-bar fallback: {text[:300]}"


def test_console_lines_of_labkit_lab():
    """labkit lab's console gets the trainer's epoch, resume and controller lines of a notebook, nothing
    else."""
    from labkit.lab.notebooks import _Lines

    seen = []
    sink = _Lines(seen.append, "  03  ", lambda line: bool(CONSOLE_LINE.match(line.strip())))
    sink.write("embedded-pact: PACT/TQT MobileNetV2\n[linear controller] start: 53 quantizers, eps 0.001 .. "
               "0.01\nep")
    sink.write("och   1/4  lr 0.002  train loss 0.1\nsome other line\n")
    sink.write("runs/x is complete (4 epochs): nothing to train\n")
    assert seen == ["  03  [linear controller] start: 53 quantizers, eps 0.001 .. 0.01",
                    "  03  epoch   1/4  lr 0.002  train loss 0.1",
                    "  03  runs/x is complete (4 epochs): nothing to train"]


def output_text(nb) -> str:
    """Everything the cells printed or displayed as plain text (streams, results, rich displays)."""
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.slow
def test_convert_notebook_under_papermill(tmp_path):
    """With a torchvision weights file (random weights stand in for the download) the notebook converts it,
    reports the logit check and writes the checkpoint; without one it shows the demo and writes nothing."""
    import torch

    from fixtures import random_torchvision_model

    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(random_torchvision_model().state_dict(), weights)
    text = run_notebook("01_convert_checkpoint.ipynb", tmp_path, torchvision_weights=str(weights),
                        output_dir=str(tmp_path / "conv"))
    assert "max |logit difference| to torchvision's network" in text and "(identical)" in text
    assert (tmp_path / "conv" / "mobilenetv2_1.0.ckpt").is_file()


@pytest.mark.slow
def test_fp32_notebook_under_papermill_with_other_parameters(tmp_path):
    run_dir = tmp_path / "fp32"
    text = run_notebook("02_fp32_check.ipynb", tmp_path, epochs=1, output_dir=str(run_dir), device="cpu",
                        expect_top1=100.0)
    assert "epoch   1/1" in text and "1 epochs in" in text
    assert "WARNING: best top-1" in text and "expected >= 100%" in text  # the baseline check of the last cell
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and (run_dir / "best.ckpt").is_file()


def _history(top1s):
    best = 0.0
    for epoch, top1 in enumerate(top1s):
        best = max(best, top1)
        yield {"epoch": epoch, "seconds": 2.0, "best_top1": best, "valid": {"top1": top1, "loss": 1.0},
               "train": {"top1": top1, "loss": 1.0}}


@pytest.mark.parametrize("top1s, warned", [([9.0, 11.0], True), ([60.0, 85.0], True), ([90.0, 97.5], False)])
def test_what_we_saw_computes_the_numbers_and_warns_on_a_weak_baseline(tmp_path, top1s, warned):
    """Notebook 02's conclusion: first/last/best top-1 and time from the run folder; a warning below
    ``expect_top1`` (90 here) or within twice of chance (10 classes: 20%)."""
    from labkit.lab.steps import what_we_saw

    cfg = load_config(EMBEDDED_FP32, check_files=False)  # a run folder holds the resolved config
    assert cfg["network"]["kwargs"]["num_classes"] == 10
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _history(top1s)))
    text = repr(what_we_saw(tmp_path, expect_top1=90.0))
    assert f"2 epochs in 4 s: valid top-1 {top1s[0]:.2f}% after epoch 1, {top1s[1]:.2f}% at the end, best " \
           f"{max(top1s):.2f}%" in text
    assert ("WARNING: best top-1" in text) == warned
