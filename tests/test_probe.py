"""Plans chosen by a short QAT probe: the probe config as documented, distinct candidates, and the chosen plan
the one of least probe training loss, which a separate training run of its probe config reproduces."""

import json
import types

import pytest
import torch

from labkit.cli import main
from labkit.config.loading import load_config
from labkit.precision.bitplan import BitPlan
from labkit.lab.probe import PROBE_IMAGES, candidates, probe_config, probe_table, propose_probed
from labkit.precision.sensitivity import CACHE, cache_key
from labkit.train.build import build_float_network
from labkit.train.checkpoint import make_checkpoint, save_atomic
from labkit.train.loop import train

from helpers import ROOT, random_sensitivity, tiny_overrides

PACT4 = ROOT / "configs" / "embedded" / "config.pact.4b.json"
BOPS = "weight_bytes=uniform:3,act_bytes=uniform:3,BOPs=uniform:3"


def test_probe_config_trains_two_epochs_with_every_quantizer_from_the_start():
    cfg = load_config(PACT4, check_files=False)
    before = json.dumps(cfg, sort_keys=True)
    probe = probe_config(cfg, "/some/fp32.ckpt")
    assert json.dumps(cfg, sort_keys=True) == before  # the base config is not changed
    training = probe["training"]
    assert training["n_epochs"] == 2 and probe["network"]["pretrained"] == "/some/fp32.ckpt"
    assert training["gd"]["lr_sched"] == {"class": "HandScheduler",
                                          "kwargs": {"schedule": {"0": 1, "1": 0.1}}}
    assert training["quantize"]["kwargs"]["schedules"] == {"linear": {"0": ["start"]},
                                                          "activation": {"0": ["start"]}}
    assert probe["data"]["train"]["dataset"]["limit"] == PROBE_IMAGES
    assert probe_config(cfg, "x", epochs=3, images=100)["training"]["gd"]["lr_sched"]["kwargs"] == \
        {"schedule": {"0": 1, "2": 0.1}}
    small = probe_config({**cfg, "data": {**cfg["data"], "train": {"dataset": {"limit": 64}}}}, "x")
    assert small["data"]["train"]["dataset"]["limit"] == 64  # a smaller limit of the config is kept
    assert training["gd"]["opt"] == cfg["training"]["gd"]["opt"] and probe["network"]["quantize"] == \
        cfg["network"]["quantize"]


def test_candidates_keep_the_first_scale_of_each_distinct_plan():
    def fake(bits):
        return types.SimpleNamespace(plan=types.SimpleNamespace(w_bits={"a": bits[0]}, a_bits={"x": bits[1]}))

    plans = {1.0: (4, 4), 0.3: (4, 4), 0.1: (2, 4), 0.03: (2, 4), 0.01: (2, 8)}
    found = candidates(lambda lam: fake(plans[lam]), tuple(plans))
    assert [lam for lam, _ in found] == [1.0, 0.1, 0.01]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The PACT 4b config on 64 training images from a random FP32 checkpoint whose sensitivity.json holds a
    synthetic entry (so nothing is measured)."""
    folder = tmp_path_factory.mktemp("probe")
    cfg = load_config(PACT4, tiny_overrides(**{"data.train.dataset.limit": 64, "data.train.dataloader.bs": 16,
                                               "data.valid.dataset.limit": 32}), check_files=False)
    torch.manual_seed(0)
    save_atomic(make_checkpoint(build_float_network(cfg).state_dict(), {}), folder / "best.ckpt")
    cfg["network"]["pretrained"] = str(folder / "best.ckpt")
    sens = random_sensitivity(BitPlan.from_config(cfg), (2, 3, 4, 8), 4)
    sens.key, sens.checkpoint, sens.n_calib = cache_key(cfg, folder / "best.ckpt", (2, 3, 4, 8), 8), \
        str(folder / "best.ckpt"), 8
    (folder / CACHE).write_text(json.dumps({sens.key: sens.as_json()}))
    return cfg, folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no statistics were gathered")
def test_the_plan_of_least_probe_loss_wins_and_its_score_is_the_probe_training_loss(tiny_run, tmp_path,
                                                                                    one_thread):
    cfg, folder = tiny_run
    lines = []
    best, probed = propose_probed(cfg, BOPS, n_calib=8, log=lines.append)
    assert len(probed) >= 2 and len(lines) == len(probed)
    assert [p.score for p in probed] == sorted(p.score for p in probed) and best is probed[0].allocation
    assert len({p.weight_scale for p in probed}) == len(probed)
    assert "by the least training loss of a 2-epoch QAT probe" in best.description()
    assert all(p.allocation.totals[k] <= v for p in probed for k, v in p.allocation.budget.items())
    again = train(probe_config(best.config(), str(folder / "best.ckpt")), tmp_path / "again", progress=False,
                  log=None, tensorboard=False)
    assert again["train"]["loss"] == probed[0].score  # the score is that training's loss, bit for bit
    assert len(probe_table(probed)) == len(probed)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no statistics were gathered")
def test_cli_plan_probes_a_bops_budget_and_no_probe_skips_it(tiny_run, tmp_path, capsys, one_thread):
    cfg, folder = tiny_run
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    probed, plain = tmp_path / "probed.json", tmp_path / "plain.json"
    argv = ["plan", str(config), "--run", str(folder), "-b", BOPS, "--calib", "8"]
    assert main([*argv, "-o", str(probed)]) == 0
    printed = capsys.readouterr().out
    assert "candidate plans, best probe first" in printed and "probe loss" in printed
    assert "2-epoch QAT probe" in json.loads(probed.read_text())["description"]
    assert main([*argv, "--no-probe", "-o", str(plain)]) == 0
    assert "candidate plans" not in capsys.readouterr().out
    assert "QAT probe" not in json.loads(plain.read_text())["description"]
