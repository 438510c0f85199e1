"""Notebooks: committed without outputs, a papermill parameters cell, and runs with non-default parameters.

nbval (``pytest --nbval-lax notebooks``) runs them top to bottom with their defaults in CI as well.
"""

import json
from pathlib import Path

import pytest

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
    import papermill

    out = tmp_path / name
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters=parameters,
                               cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    return output_text(json.loads(out.read_text()))


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
    text = run_notebook("02_fp32_check.ipynb", tmp_path, epochs=1, output_dir=str(run_dir), device="cpu")
    assert "epoch   1/1" in text and "1 of 1 epochs, final top-1" in text
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and (run_dir / "best.ckpt").is_file()
