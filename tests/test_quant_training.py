"""End to end: PACT and TQT QAT with `labkit train` from an FP32 checkpoint of the embedded default."""

import pytest
import torch

from labkit.config.loading import load_config
from labkit.train.checkpoint import load_file
from labkit.train.evaluate import evaluate_checkpoint
from labkit.train.loop import train
from labkit.train.runs import read_history

from helpers import QUIET, EMBEDDED_FP32, ROOT, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """A converged-enough FP32 net (~90% top-1 on 512 training digits, 8 one-cycle epochs, ~20 s)."""
    run = tmp_path_factory.mktemp("fp32")
    overrides = tiny_overrides(**{"training.n_epochs": 8, "data.train.dataset.limit": 512})
    overrides.pop("training.gd.lr_sched")
    overrides.pop("training.gd.opt.kwargs.lr")
    result = train(load_config(EMBEDDED_FP32, overrides), run, **QUIET)
    assert result["best_top1"] > 80
    return run / "best.ckpt"


def quant_config(name, pretrained, **extra):
    overrides = tiny_overrides(**{"network.pretrained": str(pretrained), "training.n_epochs": 3, **extra})
    overrides.pop("training.gd.lr_sched")
    overrides.pop("training.gd.opt.kwargs.lr")
    return load_config(ROOT / "configs" / "embedded" / f"config.{name}.json", overrides)


class Interrupt(Exception):
    pass


def test_pact_learns_alpha_records_bounds_and_resumes_exactly(fp32_checkpoint, tmp_path):
    cfg = quant_config("pact", fp32_checkpoint)
    train(cfg, tmp_path / "full", **QUIET)
    history = read_history(tmp_path / "full")
    quant = [r["quant"] for r in history]
    act = "features.3.residual_branch.0.2"
    # activations start at epoch 1 from the const bound 6.0 and learn alpha by the PACT gradient
    assert quant[1][act]["hi"] != 6.0 and quant[2][act]["hi"] != quant[1][act]["hi"]
    conv = quant[0]["features.3.residual_branch.0.0"]
    assert conv["eps"] == pytest.approx((conv["hi"] - conv["lo"]) / 255, rel=1e-5)
    assert {"lo", "hi", "eps", "n_levels"} <= set(quant[0]["classifier.1"])

    def stop_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "split", **QUIET, callbacks=[stop_after_epoch_1])
    train(cfg, tmp_path / "split", resume=True, **QUIET)
    full = load_file(tmp_path / "full" / "last.ckpt")
    split = load_file(tmp_path / "split" / "last.ckpt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    assert full["controllers"] == split["controllers"]
    assert evaluate_checkpoint(tmp_path / "full" / "last.ckpt",
                               device="cpu")["top1"] == history[-1]["valid"]["top1"]


def test_tqt_records_log2_thresholds(fp32_checkpoint, tmp_path):
    cfg = quant_config("tqt", fp32_checkpoint)
    result = train(cfg, tmp_path / "tqt", **QUIET)
    history = read_history(tmp_path / "tqt")
    layer = history[-1]["quant"]["features.3.residual_branch.0.2"]
    assert "log2_t" in layer
    assert history[-1]["quant"]["features.3.residual_branch.0.2"]["log2_t"] != \
        history[1]["quant"]["features.3.residual_branch.0.2"]["log2_t"]
    fp32_top1 = evaluate_checkpoint(fp32_checkpoint, device="cpu")["top1"]
    assert result["best_top1"] >= fp32_top1 - 5  # 8-bit QAT from a trained FP32 net keeps its accuracy
