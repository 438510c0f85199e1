"""``training.ema``: the moving average of the weights (labkit.train.ema) and how a run validates,
checkpoints, resumes and integerizes it."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from labkit.config.loading import load_config
from labkit.config.schema import ConfigError
from labkit.integer import compare, integerize
from labkit.lab.twins import integerize_run
from labkit.quant import PACTConv2d, PACTLinear
from labkit.quant.recipe import pact_recipe
from labkit.train.checkpoint import load_file
from labkit.train.data import EmbeddedDigits
from labkit.train.ema import WeightEMA
from labkit.train.evaluate import evaluate_checkpoint
from labkit.train.loop import TRAINED_WEIGHTS, train
from labkit.train.runs import read_history

from helpers import QUIET, ROOT, SMALL_QUANTIZE, SmallNet, TRAIN_THREADS, intra_op_threads, tiny_overrides

PACT4 = ROOT / "configs" / "embedded" / "config.pact.4b.json"


def small_quantized_net():
    torch.manual_seed(0)
    net, _ = pact_recipe(SmallNet(), copy.deepcopy(SMALL_QUANTIZE))
    for m in net.modules():
        if isinstance(m, (PACTConv2d, PACTLinear)):  # the weights' quantizers
            m.start()
    return net


def test_average_follows_the_formula_from_its_start_epoch_on():
    net = small_quantized_net()
    ema = WeightEMA(net, decay=0.75, start_epoch=1)
    every = dict(net.named_parameters())
    assert ema.names and all(n.rsplit(".", 1)[-1] in ("weight", "bias") for n in ema.names)
    assert set(every) - set(ema.names), "the quantizers' learned clips are not averaged"
    w = net.get_parameter("conv1.weight")
    ema.begin_epoch(0)
    with torch.no_grad():
        w.add_(1.0)
    ema.update()  # epoch 0 < start_epoch: nothing is averaged
    assert not ema.active
    ema.begin_epoch(1)  # the average starts from the weights of now
    start = w.detach().clone()
    assert torch.equal(ema.averages[ema.names.index("conv1.weight")], start)
    expected = start.clone()
    for step in range(3):
        with torch.no_grad():
            w.mul_(0.5).add_(step)
        ema.update()
        expected = 0.75 * expected + 0.25 * w.detach()
    torch.testing.assert_close(ema.averages[ema.names.index("conv1.weight")], expected, rtol=1e-6, atol=1e-6)


def test_the_averaged_copy_holds_the_averages_with_its_weight_bounds_rederived():
    net = small_quantized_net()
    ema = WeightEMA(net, decay=0.5)
    ema.begin_epoch(0)
    start_hi = net.conv1.quant_summary()["hi"]
    with torch.no_grad():
        net.get_parameter("conv1.weight").mul_(3.0)
    ema.update()  # the average is 2x the start
    twin = ema.averaged(net)
    assert twin is not net and net.conv1.quant_summary()["hi"] == start_hi  # the trained net is untouched
    torch.testing.assert_close(twin.conv1.weight, net.conv1.weight * 2 / 3)
    # conv1's bounds follow its weights by a rule of their magnitude: 2x the weights, 2x the bounds
    assert twin.conv1.quant_summary()["hi"] == pytest.approx(2 * start_hi, rel=1e-6)


def test_decay_outside_zero_one_is_refused_naming_the_key():
    for decay in (1.0, 0.0, -0.5):
        with pytest.raises(ConfigError, match=r"training\.ema\.decay"):
            load_config(PACT4, {"network.pretrained": None, "training.ema": {"decay": decay}})
    with pytest.raises(ConfigError, match=r"training\.ema\.start.*did you mean 'start_epoch'"):
        load_config(PACT4, {"network.pretrained": None, "training.ema": {"decay": 0.9, "start": 1}})


def tiny_pact(**extra):
    """3 epochs of 2 batches, the average from epoch 1 on."""
    overrides = tiny_overrides(**{
        "network.pretrained": None, "training.n_epochs": 3, "data.train.dataset.limit": 64,
        "data.valid.dataset.limit": 60,
        "training.gd.lr_sched": {"class": "HandScheduler", "kwargs": {"schedule": {"0": 1, "2": 0.1}}},
        "training.ema": {"decay": 0.9, "start_epoch": 1}, **extra})
    return load_config(PACT4, overrides)


class Interrupt(Exception):
    pass


def stop_after_epoch_1(record):
    if record["epoch"] == 1:
        raise Interrupt


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """``full``: tiny_pact() in one go; ``split``: the same, killed after epoch 1 was saved, then resumed."""
    root = tmp_path_factory.mktemp("ema")
    with intra_op_threads(TRAIN_THREADS):
        cfg = tiny_pact()
        train(cfg, root / "full", **QUIET)
        with pytest.raises(Interrupt):
            train(cfg, root / "split", **QUIET, callbacks=[stop_after_epoch_1])
        train(cfg, root / "split", resume=True, **QUIET)
    return root


def test_a_run_validates_and_checkpoints_the_average(ema_runs):
    run = ema_runs / "full"
    history = read_history(run)
    assert [r.get("weights") for r in history] == [None, "ema", "ema"]
    ckpt = load_file(run / "last.ckpt")
    saved, trained = ckpt["state_dict"], ckpt[TRAINED_WEIGHTS]
    averaged = [n for n in saved if n.endswith((".weight", ".bias"))]
    assert averaged and any(not torch.equal(saved[n], trained[n]) for n in averaged)
    # batch-norm and activation statistics are the trained network's
    kept = [n for n in saved if n.endswith(("running_mean", "running_var", "running_min", "running_max"))]
    assert kept and all(torch.equal(saved[n], trained[n]) for n in kept)
    # what the history reports is the checkpoint's (averaged) network
    assert evaluate_checkpoint(run / "last.ckpt", device="cpu")["top1"] == pytest.approx(
        history[-1]["valid"]["top1"])


def test_an_interrupted_run_resumes_its_average(ema_runs):
    full, split = load_file(ema_runs / "full" / "last.ckpt"), load_file(ema_runs / "split" / "last.ckpt")
    for key in ("state_dict", TRAINED_WEIGHTS):
        assert full[key].keys() == split[key].keys()
        for name in full[key]:
            assert torch.equal(full[key][name], split[key][name]), (key, name)


@pytest.mark.slow
def test_the_average_integerizes_exactly(ema_runs, one_thread):
    """float64 fake-quant and integer networks of an averaged checkpoint predict alike on every image."""
    twin = integerize_run(ema_runs / "full" / "last.ckpt")
    q64 = copy.deepcopy(twin.qnet).double()
    exact = compare(q64, integerize(q64, twin.inet.eps_in, (1, 3, 32, 32)),
                    DataLoader(EmbeddedDigits("valid"), batch_size=120))
    assert exact.predictions == 100.0 and exact.top1_int == exact.top1_fake


def test_a_run_shorter_than_start_epoch_keeps_its_trained_weights(tmp_path, one_thread):
    train(tiny_pact(**{"training.n_epochs": 1}), tmp_path / "run", progress=False, log=None,
          tensorboard=False)
    ckpt = load_file(tmp_path / "run" / "last.ckpt")
    assert TRAINED_WEIGHTS not in ckpt and "weights" not in read_history(tmp_path / "run")[0]
