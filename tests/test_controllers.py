"""Epoch-schedule controllers: commands, adder eps sync, state and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from labkit.quant import (
    PACTSGD,
    PACTConv2d,
    PACTIntegerAdd,
    PACTLinear,
    PACTUnsignedAct,
    get_pact_controllers,
    parse_schedule,
)
from labkit.quant import init as qinit

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = {"linear": {"0": ["start", "verbose_on"], "2": "freeze"},
             "activation": {"1": ["start"], "3": "freeze"}}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PACTConv2d(3, 4, 3, padding=1, quantize="per_channel", init_clip="max", learn_clip=True)
        self.act = PACTUnsignedAct(n_levels=16, init_clip="max", learn_clip=True)
        self.conv2 = PACTConv2d(4, 4, 1, init_clip="sawb_asymm")
        self.add = PACTIntegerAdd(n_levels=16, init_clip="max", learn_clip=True)
        self.act2 = PACTUnsignedAct(n_levels=16, init_clip="const", act_kind="relu")
        self.fc = PACTLinear(4, 3, init_clip="max")

    def forward(self, x):
        h = self.act(self.conv(x))
        h = self.act2(self.add(h, self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _data():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(8, 3, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def _run_epochs(net, ctrls, opt, epochs, data):
    for epoch in epochs:
        for c in ctrls:
            c.step_pre_training_epoch(epoch)
        net.train()
        for x, y in data:
            for c in ctrls:
                c.step_pre_training_batch()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        for c in ctrls:
            c.step_pre_validation_epoch(epoch)


def _make(seed=0):
    torch.manual_seed(seed)
    net = Tiny()
    ctrls = get_pact_controllers(net, SCHEDULES, kwargs_activation={"init_clip_hi": 6.0})
    opt = PACTSGD(net, pact_decay=1e-3, lr=0.05, momentum=0.9, weight_decay=4e-5)
    return net, ctrls, opt


def test_parse_schedule_and_errors():
    assert parse_schedule({"0": ["start", "verbose_on"], "4": "freeze"}) == {0: ["start", "verbose_on"],
                                                                             4: ["freeze"]}
    with pytest.raises(ValueError, match="'begin'.*allowed: start, freeze, thaw, stop, verbose_on, "
                                         "verbose_off"):
        parse_schedule({"0": "begin"})
    with pytest.raises(ValueError, match="epoch key"):
        parse_schedule({"zero": "start"})
    net = Tiny()
    with pytest.raises(ValueError, match="weights"):
        get_pact_controllers(net, {"weights": {}})
    with pytest.raises(TypeError, match="init_clip_max"):
        get_pact_controllers(net, {"activation": {}}, kwargs_activation={"init_clip_max": 6})
    with pytest.raises(ValueError, match="unknown command 'go'"):
        get_pact_controllers(net, {"activation": {}})[0].apply("go")


def test_controllers_cover_the_right_modules():
    net = Tiny()
    lin, act = get_pact_controllers(net, SCHEDULES)
    assert {n for n, _ in lin.modules} == {"conv", "conv2", "fc"}
    assert {n for n, _ in act.modules} == {"act", "act2", "add.acts.0", "add.acts.1", "add.act_out"}
    assert act.adders == [net.add] and lin.adders == []
    only_act = get_pact_controllers(net, {"activation": {"0": "start"}})
    assert len(only_act) == 1 and only_act[0].name == "activation"


def test_schedule_drives_state_and_statistics(capsys):
    net, ctrls, opt = _make()
    data = _data()
    _run_epochs(net, ctrls, opt, [0], data)
    assert net.conv.started and net.fc.started and not net.act.started
    assert "linear controller] start" in capsys.readouterr().out  # verbose_on came with start
    assert net.act.n_stat_batches.item() == len(data)  # statistics gathered in float epoch 0
    running_max = net.act.running_max.item()
    for c in ctrls:
        c.step_pre_training_epoch(1)
    assert net.act.started and not net.conv.frozen
    # init from statistics gathered before start; const (kwargs_activation init_clip_hi = 6) gives [0, 6]
    assert net.act.get_clip()[1].item() == running_max
    lo, hi = net.act2.get_clip()
    assert (lo.item(), hi.item()) == (0.0, 6.0)
    _run_epochs(net, ctrls, opt, [1], data)
    assert net.act.n_stat_batches.item() == len(data)  # no statistics after start
    _run_epochs(net, ctrls, opt, [2], data)
    assert net.conv.frozen and not net.act.frozen
    assert running_max > 0


def test_pact_alpha_moves_while_started_and_stops_when_frozen():
    net, ctrls, opt = _make()
    data = _data()
    _run_epochs(net, ctrls, opt, [0, 1], data)
    a_start = net.act.clip_hi.item()
    _run_epochs(net, ctrls, opt, [2], data)
    a_mid = net.act.clip_hi.item()
    assert a_mid != a_start  # learned (PACT gradient + pact_decay)
    _run_epochs(net, ctrls, opt, [3, 4], data)
    a_frozen = net.act.clip_hi.item()
    _run_epochs(net, ctrls, opt, [5], data)
    assert net.act.clip_hi.item() == a_frozen


def test_adder_eps_synced_before_every_batch():
    net, ctrls, opt = _make()
    data = _data()
    _run_epochs(net, ctrls, opt, [0, 1], data)
    eps0, eps1 = net.add.acts[0].get_eps().item(), net.add.acts[1].get_eps().item()
    assert eps0 == pytest.approx(eps1)
    # learning moves the inputs apart; the next batch hook brings them back to the larger eps
    with torch.no_grad():
        net.add.acts[0].clip_hi.mul_(1.5)
    target = max(net.add.acts[0].get_eps().item(), net.add.acts[1].get_eps().item())
    ctrls[1].step_pre_training_batch()
    assert net.add.acts[0].get_eps().item() == pytest.approx(target)
    assert net.add.acts[1].get_eps().item() == pytest.approx(target)


def _max_abs(w, per_channel):
    return w.detach().abs().amax(dim=(1, 2, 3)) if per_channel else w.detach().abs().max()


def test_weight_bounds_follow_the_weights_until_frozen():
    net, ctrls, opt = _make()
    data = _data()
    _run_epochs(net, ctrls, opt, [0, 1], data)
    # after the pre-validation hook the bounds that are not learned are those of the current weights
    torch.testing.assert_close(net.fc.clip_hi, _max_abs(net.fc.weight, False), rtol=0, atol=0)
    sawb = qinit.sawb_clip(net.conv2.weight, 256, "sawb_asymm")
    torch.testing.assert_close(net.conv2.clip_hi, sawb, rtol=0, atol=0)
    assert net.fc.follows_weights and net.conv2.follows_weights and not net.conv.follows_weights
    learned = net.conv.clip_hi.clone()
    with torch.no_grad():
        for m in (net.conv, net.conv2, net.fc):
            m.weight.mul_(1.5)
    ctrls[0].step_pre_training_batch()
    torch.testing.assert_close(net.fc.clip_hi, _max_abs(net.fc.weight, False), rtol=0, atol=0)
    torch.testing.assert_close(net.conv2.clip_hi, 1.5 * sawb, rtol=1e-6, atol=0)
    assert torch.equal(net.conv.clip_hi, learned)  # learn_clip: bounds are parameters, not a function of w
    lo, hi = net.fc.get_clip()
    assert lo.item() == -net.fc.weight.abs().max().item() and hi.item() == pytest.approx(
        -lo.item() * 127 / 128
    )
    # the weights moved by training too: right before the next batch the bounds are those of the new weights
    _run_epochs(net, ctrls, opt, [2], data)  # freeze at 2
    frozen = net.fc.clip_hi.clone()
    assert net.fc.frozen and not net.fc.follows_weights
    with torch.no_grad():
        net.fc.weight.mul_(2.0)
    ctrls[0].step_pre_training_batch()
    ctrls[0].step_pre_validation_epoch(2)
    assert torch.equal(net.fc.clip_hi, frozen)  # frozen bounds stay where they were
    ctrls[0].apply("thaw")
    ctrls[0].step_pre_training_batch()
    torch.testing.assert_close(net.fc.clip_hi, _max_abs(net.fc.weight, False), rtol=0, atol=0)


def test_refresh_bounds_equals_the_start_rule_and_leaves_const_and_tqt_state_alone():
    torch.manual_seed(1)
    for settings in ({"init_clip": "max", "symm_wts": True}, {"init_clip": "max", "symm_wts": False},
                     {"init_clip": "sawb_symm", "n_levels": 16}, {"init_clip": "std", "nb_std": 2.0},
                     {"init_clip": "max", "tqt": True}, {"init_clip": "const", "init_clip_hi": 0.1}):
        for quantize in ("per_channel", "per_layer"):
            conv = PACTConv2d(4, 6, 3, quantize=quantize, learn_clip=False, **settings)
            conv.start()
            with torch.no_grad():
                conv.weight.mul_(3.0)
            fresh = copy.deepcopy(conv)
            fresh.stop()
            fresh.start()  # the init rule on the current weights
            before = copy.deepcopy(conv.state_dict())
            assert conv.refresh_bounds() == (settings["init_clip"] != "const")
            for key, value in conv.state_dict().items():
                expect = before[key] if settings["init_clip"] == "const" or key.startswith("tqt_") else \
                    fresh.state_dict()[key]
                torch.testing.assert_close(value, expect, rtol=0, atol=0, msg=f"{settings} {quantize} {key}")


def test_skipped_epochs_are_caught_up_and_commands_idempotent():
    net, ctrls, _ = _make()
    ctrls[0].step_pre_training_epoch(3)  # start (0) and freeze (2) both applied, in order
    assert net.conv.started and net.conv.frozen
    with torch.no_grad():
        net.conv.clip_hi.fill_(0.123)
    fresh = get_pact_controllers(net, SCHEDULES)
    fresh[0].step_pre_training_epoch(3)  # re-applying start keeps the (learned) bounds
    assert torch.allclose(net.conv.clip_hi, torch.tensor(0.123))


def test_resume_matches_uninterrupted_run():
    data = _data()
    net_a, ctrls_a, opt_a = _make()
    _run_epochs(net_a, ctrls_a, opt_a, range(6), data)

    net_b, ctrls_b, opt_b = _make()
    _run_epochs(net_b, ctrls_b, opt_b, range(2), data)  # checkpoint after epoch 1
    ckpt = copy.deepcopy({"net": net_b.state_dict(), "opt": opt_b.state_dict(),
                          "ctrls": [c.state_dict() for c in ctrls_b]})

    net_c, ctrls_c, opt_c = _make(seed=99)  # a fresh process: other initial weights, nothing started
    net_c.load_state_dict(ckpt["net"])
    opt_c.load_state_dict(ckpt["opt"])
    for c, s in zip(ctrls_c, ckpt["ctrls"]):
        c.load_state_dict(s)
    assert net_c.act.started and not net_c.conv.frozen and ctrls_c[0].verbose
    _run_epochs(net_c, ctrls_c, opt_c, range(2, 6), data)

    sa, sc = net_a.state_dict(), net_c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=0, msg=k)
    for name in ("conv", "conv2", "fc", "act", "act2"):
        ma, mc = getattr(net_a, name), getattr(net_c, name)
        assert (ma.started, ma.frozen) == (mc.started, mc.frozen)


def test_stop_and_thaw_commands():
    net = Tiny()
    (ctrl,) = get_pact_controllers(net, {"linear": {"0": "start", "1": "freeze", "2": "thaw", "3": "stop"}})
    ctrl.step_pre_training_epoch(1)
    assert net.fc.frozen
    ctrl.step_pre_training_epoch(2)
    assert not net.fc.frozen and net.fc.started
    ctrl.step_pre_training_epoch(3)
    assert not net.fc.started
    x = torch.randn(2, 4)
    torch.testing.assert_close(net.fc(x), F.linear(x, net.fc.weight, net.fc.bias))
    assert ctrl.state_dict()["last_epoch"] == 3


def test_verbose_commands_are_one_line_with_every_bound_kept():
    """A verbose controller logs one line per command; every quantizer's bounds go to ``events`` (the trainer
    writes them to quantizers.jsonl); ``detail`` adds one line per quantizer."""
    net, ctrls, _ = _make()
    lines = []
    linear = next(c for c in ctrls if c.name == "linear")
    linear.log = lines.append
    linear.step_pre_training_epoch(0)
    assert len(lines) == 1 and lines[0].startswith("[linear controller] start: 3 quantizers, eps ")
    event = linear.events[-1]
    assert (event["epoch"], event["command"]) == (0,
                                                  "start") and [q["name"] for q in event["quantizers"]] == \
        ["conv", "conv2", "fc"]
    lo, hi = net.conv.get_clip_w()
    assert event["quantizers"][0]["hi"] == pytest.approx(float(hi.float().mean()))
    linear.detail = True
    linear.step_pre_training_epoch(2)
    assert lines[1].startswith("[linear controller] freeze: 3 quantizers") and len(lines) == 5
    assert lines[2].startswith("  conv: lo=")
