"""TensorBoard events of a run folder: read back with TensorBoard's own reader, every scalar equals
history.jsonl's value (as float32) at step epoch + 1, also after a resume that lost one epoch's events and
finds another session's stale ones; histograms at each quantizer's start and at the end."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from labkit.config.loading import load_config
from labkit.train.loop import train
from labkit.train.runs import read_history
from labkit.train.checkpoint import load_file
from labkit.train.tensorboard import HISTOGRAM_BINS, layer_group, quant_tag, record_scalars, scalar_layout

from helpers import QUIET, ROOT, tiny_overrides

#: the quickest PACT run that starts weights (epoch 0) and activations (epoch 1) quantizers
TINY_PACT = tiny_overrides(**{"network.pretrained": None, "data.train.dataset.limit": 32,
                              "data.valid.dataset.limit": 16, "data.train.dataloader.bs": 16,
                              "training.n_epochs": 3})


def events(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    return acc


def expected_scalars(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the events must hold, written out from the records without labkit's tag function."""
    out: dict[str, list] = {}

    def put(tag, step, value):
        out.setdefault(tag, []).append((step, float(np.float32(value))))

    for r in history:
        step = r["epoch"] + 1
        for split in ("train", "valid"):
            for m in ("loss", "top1", "top5"):
                put(f"{m}/{split}", step, r[split][m])
        for k in ("lr", "best_top1", "seconds"):
            put(k, step, r[k])
        for name, q in r.get("quant", {}).items():
            block = name.split(".")
            group = ".".join(block[:2]) if len(block) > 2 and block[1].isdigit() else block[0]
            for k in ("lo", "hi", "eps", "log2_t", "hi_min", "hi_max", "lo_min", "lo_max"):
                if k in q and math.isfinite(q[k]):
                    put(f"quant.{group}/{name}/{k}", step, q[k])
    return out


def assert_events_equal_history(folder) -> EventAccumulator:
    acc = events(folder)
    want = expected_scalars(read_history(folder))
    assert sorted(acc.Tags()[SCALARS]) == sorted(want)
    for tag, points in want.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == points, tag
    return acc


def test_tags_and_groups():
    assert layer_group("features.3.residual_branch.1.2") == "features.3"
    assert layer_group("features.17.0") == "features.17"
    assert layer_group("pilot.2") == "pilot" and layer_group("classifier.1") == "classifier"
    record = {"epoch": 4, "lr": 0.1, "best_top1": 50.0, "seconds": 2.0,
              "train": {"loss": 1.5, "top1": 40.0, "top5": 90.0, "n": 32},
              "valid": {"loss": float("nan"), "top1": 50.0, "top5": 95.0, "n": 16},
              "quant": {"pilot.0": {"lo": -1.0, "hi": 1.0, "eps": 0.01, "n_levels": 256, "kind": "weights"},
                        "features.2.residual_branch.0.2": {"lo": 0.0, "hi": 6.0, "eps": 0.02, "log2_t": 2.58,
                                                           "n_levels": 256, "kind": "activations"}}}
    scalars = record_scalars(record)
    assert "loss/valid" not in scalars and "n/train" not in scalars  # NaN and counts are no curves
    assert scalars["top1/valid"] == 50.0 and scalars[quant_tag("pilot.0", "hi")] == 1.0
    assert scalars["quant.features.2/features.2.residual_branch.0.2/log2_t"] == 2.58
    assert not any("n_levels" in t or "kind" in t for t in scalars)
    layout = scalar_layout(record)
    assert set(layout) == {"quant.pilot", "quant.features.2"}
    assert layout["quant.features.2"]["log2_t"] == ["Multiline", [r"^quant\.features\.2/.*/log2_t$"]]


def test_events_equal_history_also_after_a_resume(tmp_path):
    """Session 1 trains epoch 1 and is stopped by a callback after epoch 2 is saved but before its events are
    written (a kill between checkpoint and flush); a stale event of another session sits at step 3. Session 2
    resumes: the events now hold exactly history.jsonl's values, one per step."""
    cfg = load_config(ROOT / "configs" / "embedded" / "config.pact.json", TINY_PACT)
    run = tmp_path / "run"

    def stop_after_second_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, log=None, callbacks=[stop_after_second_epoch])
    assert len(read_history(run)) == 2 and sorted(s.step for s in events(run).Scalars("lr")) == [1]
    stale = SummaryWriter(str(run), filename_suffix=".stale")
    stale.add_scalar("lr", 123.0, 3, new_style=False)
    stale.add_scalar("top1/valid", -1.0, 3, new_style=False)
    stale.close()
    result = train(cfg, run, resume=True, progress=False, log=None)
    history = read_history(run)
    assert len(history) == 3 and result["valid"]["top1"] == history[-1]["valid"]["top1"]
    acc = assert_events_equal_history(run)
    hist = acc.Tags()[HISTOGRAMS]
    # weights start at epoch 0 (step 0), activations at epoch 1 (step 1); every one again after the last epoch
    assert [e.step for e in acc.Histograms("weights/pilot.0")] == [0, 3]
    assert [e.step for e in acc.Histograms("activations/pilot.2")] == [1, 3]
    n_weights = sum(t.startswith("weights/") for t in hist)
    assert n_weights == len([n for n, q in history[-1]["quant"].items() if q["kind"] == "weights"])


def test_a_float_run_and_no_events_when_switched_off(tmp_path):
    fp32 = load_config(ROOT / "configs" / "embedded" / "config.fp32.json",
                       {**TINY_PACT, "training.n_epochs": 1})
    train(fp32, tmp_path / "fp32", progress=False, log=None)
    acc = assert_events_equal_history(tmp_path / "fp32")
    assert [e.step for e in acc.Histograms("weights/pilot.0")] == [0, 1]
    assert [e.step for e in acc.Histograms("activations/pilot.2")] == [0, 1]  # the ReLU6's input
    # the end histogram is the saved weight's: every value counted in HISTOGRAM_BINS equal-width buckets
    # between min and max (TensorBoard adds an empty one on the left: it keeps right edges only)
    w = load_file(tmp_path / "fp32" / "last.ckpt")["state_dict"]["pilot.0.weight"]
    h = acc.Histograms("weights/pilot.0")[-1].histogram_value
    assert (h.num, h.min, h.max) == (w.numel(), pytest.approx(w.min().item()), pytest.approx(w.max().item()))
    assert len(h.bucket) == HISTOGRAM_BINS + 1 and h.bucket[0] == 0 and sum(h.bucket) == w.numel()
    assert np.allclose(np.diff(h.bucket_limit), (h.max - h.min) / HISTOGRAM_BINS)
    train(fp32, tmp_path / "off", **QUIET)
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "off" / "history.jsonl").read_text().splitlines()[0])["epoch"] == 0
