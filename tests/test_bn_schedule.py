"""The batch-norm schedule of low-bit QAT (``schedules.batchnorm``): ``freeze`` re-estimates the running
statistics as the plain average of the next training batches, then normalises with them in training too;
``thaw`` undoes it; state survives a resume; bad schedules are refused by the config check and the
controller."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from labkit.config.loading import load_config
from labkit.config.schema import ConfigError
from labkit.quant import get_pact_controllers
from labkit.train.checkpoint import read_state_dict
from labkit.train.loop import train
from labkit.train.runs import RunFolder

from helpers import ROOT, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 5, 5, generator=g) * (1 + i),
             torch.randint(0, 3, (8,), generator=g)) for i in range(n)]


def epoch(net, ctrl, opt, number, data):
    ctrl.step_pre_training_epoch(number)
    net.train()  # as the loop does at the start of every epoch
    for x, y in data:
        ctrl.step_pre_training_batch()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    ctrl.step_pre_validation_epoch(number)


def make(schedule, recalibration_batches=2, lr=0.1):
    torch.manual_seed(0)
    net = Net()
    (ctrl,) = get_pact_controllers(net, {"batchnorm": schedule},
                                   kwargs_batchnorm={"recalibration_batches": recalibration_batches})
    ctrl.log = lambda _msg: None
    return net, ctrl, torch.optim.SGD(net.parameters(), lr=lr)


def test_freeze_averages_the_next_batches_then_keeps_the_statistics():
    data = batches()
    # lr 0: the averaged network is fixed
    net, ctrl, opt = make({"1": "freeze"}, recalibration_batches=2, lr=0.0)
    epoch(net, ctrl, opt, 0, data)
    assert net.bn.momentum == 0.1 and net.bn.training  # epoch 0: batch statistics, running averages
    epoch(net, ctrl, opt, 1, data)
    with torch.no_grad():  # the plain average of the batch statistics of the epoch's first two batches
        outs = [net.conv(x) for x, _ in data[:2]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net.bn.running_mean, mean)
    torch.testing.assert_close(net.bn.running_var, var)
    assert net.bn.momentum == 0.1  # restored for validation


def test_frozen_layers_normalise_with_the_running_statistics_while_the_affine_parameters_train():
    data = batches()
    net, ctrl, opt = make({"0": "freeze"}, recalibration_batches=0)
    stats = (net.bn.running_mean.clone(), net.bn.running_var.clone())
    weight = net.bn.weight.detach().clone()
    net.train()
    ctrl.step_pre_training_epoch(0)
    ctrl.step_pre_training_batch()
    assert not net.bn.training and net.fc.training  # only batch norm in eval mode
    epoch(net, ctrl, opt, 0, data)
    torch.testing.assert_close((net.bn.running_mean, net.bn.running_var), stats, rtol=0, atol=0)
    assert not torch.equal(net.bn.weight, weight)  # gamma still learns
    x, _ = data[0]
    ctrl.step_pre_training_batch()
    train_mode = net(x)
    net.eval()
    torch.testing.assert_close(train_mode, net(x), rtol=0, atol=0)  # training runs what evaluation runs


def test_thaw_returns_to_batch_statistics():
    data = batches()
    net, ctrl, opt = make({"0": "freeze", "1": "thaw"}, recalibration_batches=0)
    epoch(net, ctrl, opt, 0, data)
    frozen = net.bn.running_mean.clone()
    epoch(net, ctrl, opt, 1, data)
    assert net.bn.training and net.bn.momentum == 0.1 and not torch.equal(net.bn.running_mean, frozen)


def test_state_survives_a_resume_in_the_middle_of_the_averaging():
    data = batches(6)
    net, ctrl, opt = make({"1": "freeze"}, recalibration_batches=8, lr=0.05)
    epoch(net, ctrl, opt, 0, data)
    epoch(net, ctrl, opt, 1, data)  # 6 of the 8 batches averaged
    twin_net, twin_ctrl, twin_opt = make({"1": "freeze"}, recalibration_batches=8, lr=0.05)
    twin_net.load_state_dict(copy.deepcopy(net.state_dict()))
    twin_opt.load_state_dict(opt.state_dict())
    twin_ctrl.load_state_dict(ctrl.state_dict())
    assert ctrl.state_dict()["to_average"] == 2
    for n, c, o in ((net, ctrl, opt), (twin_net, twin_ctrl, twin_opt)):
        epoch(n, c, o, 2, data)
    torch.testing.assert_close(twin_net.state_dict(), net.state_dict(), rtol=0, atol=0)


def test_bad_batchnorm_schedules_are_refused():
    with pytest.raises(ValueError, match="command 'start' does not apply to batch norm"):
        make({"1": "start"})
    with pytest.raises(ValueError, match="recalibration_batches -1 is not a number of batches"):
        make({"1": "freeze"}, recalibration_batches=-1)
    path = ROOT / "configs" / "embedded" / "config.pact.4b.json"
    with pytest.raises(ConfigError, match=r"schedules\.batchnorm\.3': unknown command 'stop'"):
        load_config(path, {"training.quantize.kwargs.schedules.batchnorm": {"3": "stop"}}, check_files=False)
    with pytest.raises(ConfigError, match="recalibration_batches': must be >= 0"):
        load_config(path, {"training.quantize.kwargs.kwargs_batchnorm": {"recalibration_batches": -2}},
                    check_files=False)


def test_the_training_loop_trains_with_frozen_statistics(tmp_path):
    """Frozen from epoch 0 without averaging: a run's batch-norm statistics stay the pretrained ones (the
    controller's mode outlives the loop's ``model.train()``), while its weights train."""
    path = ROOT / "configs" / "embedded" / "config.pact.4b.json"
    overrides = tiny_overrides(**{"network.pretrained": None, "training.n_epochs": 1,
                                  "training.quantize.kwargs.schedules.batchnorm": {"0": "freeze"},
                                  "training.quantize.kwargs.kwargs_batchnorm": {"recalibration_batches": 0}})
    cfg = load_config(path, overrides, check_files=False)
    lines = []
    train(cfg, tmp_path / "run", progress=False, log=lines.append, tensorboard=False)
    state, _ = read_state_dict(RunFolder(tmp_path / "run").checkpoint("last"))
    stats = [k for k in state if k.endswith(".running_var") and k.replace("running_var",
                                                                          "num_batches_tracked") in state]
    assert stats and all(torch.equal(state[k], torch.ones_like(state[k])) for k in stats)  # fresh BN: var 1
    assert any(line.startswith("[batchnorm controller] freeze:") for line in lines)
