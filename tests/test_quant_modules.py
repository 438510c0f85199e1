"""Quantized layers: forward/backward against the formulas, init, learning alpha, adder, state, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from labkit.quant import (
    PACTSGD,
    PACTAdam,
    PACTAsymmetricAct,
    PACTConv2d,
    PACTIntegerAdd,
    PACTLinear,
    PACTUnsignedAct,
    QuantizerBase,
    normalize_tqt_grads,
    quant_summaries,
)
from labkit.quant.functional import EPS_MIN

pytestmark = pytest.mark.usefixtures("one_thread")



def ref_q(x, lo, hi, n):
    eps = (hi - lo) / (n - 1)
    return lo + eps * torch.floor((x.clamp(lo, hi) - lo) / eps + 0.5)


def gather(m, *xs):
    m.train()
    for x in xs:
        m(x)


# ----------------------------------------------------------------------------------------- activations
def test_unsigned_float_before_start_and_stats_only_in_training():
    x = torch.randn(500) * 4
    for kind, fn in (("relu", F.relu), ("relu6", F.relu6), ("identity", lambda t: t),
                     ("leaky_relu", lambda t: F.leaky_relu(t, 0.2))):
        a = PACTUnsignedAct(act_kind=kind, leaky=0.2)
        a.eval()
        torch.testing.assert_close(a(x), fn(x))
        assert a.n_stat_batches.item() == 0  # eval: no statistics
        a.train()
        a(x)
        assert a.n_stat_batches.item() == 1 and a.running_max.item() == fn(x).max().item()


@pytest.mark.parametrize("n", [3, 4, 16, 256])
def test_unsigned_forward_after_start(n):
    a = PACTUnsignedAct(n_levels=n, init_clip="const", init_clip_hi=2.5)
    a.start()
    x = torch.randn(2000) * 3
    torch.testing.assert_close(a(x), ref_q(x, torch.tensor(0.0), torch.tensor(2.5), n))
    lo, hi = a.get_clip()
    assert (lo.item(), hi.item()) == (0.0, 2.5)
    assert a.get_eps().item() == pytest.approx(2.5 / (n - 1))


def test_unsigned_pact_gradient_on_alpha():
    a = PACTUnsignedAct(n_levels=16, init_clip="const", init_clip_hi=1.0, learn_clip=True)
    a.start()
    x = (torch.randn(1000) * 2).requires_grad_()
    up = torch.randn(1000)
    a(x).backward(up)
    xd = x.detach()
    assert a.clip_hi.grad.item() == pytest.approx(up[xd >= 1.0].sum().item(), abs=1e-4)
    torch.testing.assert_close(x.grad, up * ((xd >= 0) & (xd < 1.0)))


@pytest.mark.parametrize("mode", ["max", "std", "percentile", "const"])
def test_activation_init_modes(mode):
    torch.manual_seed(0)
    a = PACTAsymmetricAct(init_clip=mode, symm=False, nb_std=2, percentile=99.0, init_clip_lo=-1,
                          init_clip_hi=3)
    x1, x2 = torch.randn(4096), torch.randn(4096) * 1.5
    gather(a, x1, x2)
    a.start()
    lo, hi = a.get_clip()
    if mode == "max":
        exp_lo, exp_hi = 0.9 * x1.min() + 0.1 * x2.min(), 0.9 * x1.max() + 0.1 * x2.max()
    elif mode == "std":
        m = 0.9 * x1.mean() + 0.1 * x2.mean()
        sd = (0.9 * x1.var() + 0.1 * x2.var()).sqrt()
        exp_lo, exp_hi = m - 2 * sd, m + 2 * sd
    elif mode == "percentile":
        exp_lo = 0.9 * torch.quantile(x1, 0.01) + 0.1 * torch.quantile(x2, 0.01)
        exp_hi = 0.9 * torch.quantile(x1, 0.99) + 0.1 * torch.quantile(x2, 0.99)
    else:
        exp_lo, exp_hi = torch.tensor(-1.0), torch.tensor(3.0)
    assert lo.item() == pytest.approx(float(exp_lo), rel=1e-4)
    assert hi.item() == pytest.approx(float(exp_hi), rel=1e-4)


def test_start_without_statistics_warns_and_uses_const():
    a = PACTUnsignedAct(init_clip="max", init_clip_hi=4.0)
    with pytest.warns(UserWarning, match="no statistics"):
        a.start()
    assert a.get_clip()[1].item() == 4.0


@pytest.mark.parametrize("n", [3, 4, 16, 255, 256])
def test_signed_almost_symmetric_range(n):
    a = PACTAsymmetricAct(n_levels=n, init_clip="const", init_clip_hi=2.0, init_clip_lo=-2.0)
    a.start()
    lo, hi = a.get_clip()
    d = n // 2
    eps = 2.0 / d
    assert lo.item() == -2.0
    assert a.get_eps().item() == pytest.approx(eps)
    assert hi.item() == pytest.approx(-2.0 + (n - 1) * eps)
    if n == 256:
        assert hi.item() == pytest.approx(2.0 * 127 / 128) and eps == pytest.approx(4.0 / 256)
    if n % 2:
        assert hi.item() == pytest.approx(2.0)  # odd: exactly symmetric
    x = torch.randn(3000) * 2
    q = a(x)
    torch.testing.assert_close(q, ref_q(x, lo, hi, n))
    assert (q == 0).any()  # zero is a grid point


def test_signed_symmetric_gradient_chain_rule():
    n = 256
    a = PACTAsymmetricAct(n_levels=n, init_clip="const", init_clip_hi=1.0)
    a.start()
    x = torch.randn(4000) * 1.2
    up = torch.randn(4000)
    a(x).backward(up)
    hi = 127 / 128
    g_hi, g_lo = up[x >= hi].sum(), up[x < -1.0].sum()
    # lo = -m, hi = m (n - 1 - n/2) / (n/2)
    assert a.clip_hi.grad.item() == pytest.approx((-g_lo + g_hi * 127 / 128).item(), abs=1e-4)


def test_signed_asymmetric_gradients():
    a = PACTAsymmetricAct(n_levels=16, symm=False, init_clip="const", init_clip_lo=-0.5, init_clip_hi=1.5)
    a.start()
    x = torch.randn(3000)
    up = torch.randn(3000)
    a(x).backward(up)
    assert a.clip_lo.grad.item() == pytest.approx(up[x < -0.5].sum().item(), abs=1e-4)
    assert a.clip_hi.grad.item() == pytest.approx(up[x >= 1.5].sum().item(), abs=1e-4)


def test_learn_clip_false_and_freeze_stop_bound_gradients():
    a = PACTUnsignedAct(init_clip="const", learn_clip=False)
    a.start()
    x = (torch.randn(100) * 10).requires_grad_()
    a(x).sum().backward()
    assert a.clip_hi.grad is None and not a.clip_hi.requires_grad and x.grad is not None
    b = PACTUnsignedAct(init_clip="const", init_clip_hi=1.0)
    b.start()
    b.freeze()
    x = (torch.randn(100) * 10).requires_grad_()
    b(x).sum().backward()
    assert b.clip_hi.grad is None and b.frozen
    b.thaw()
    b(torch.randn(100) * 10).sum().backward()
    assert b.clip_hi.grad is not None and b.clip_hi.grad.item() > 0
    b.stop()
    x = torch.randn(50) * 10
    torch.testing.assert_close(b(x), F.relu6(x))


def test_start_is_idempotent():
    a = PACTUnsignedAct(init_clip="const", init_clip_hi=6.0)
    a.start()
    with torch.no_grad():
        a.clip_hi.fill_(3.3)
    a.start()
    assert a.get_clip()[1].item() == pytest.approx(3.3)


def test_pact_alpha_really_learns_under_sgd():
    torch.manual_seed(0)
    act = PACTUnsignedAct(n_levels=16, init_clip="const", init_clip_hi=0.5, learn_clip=True)
    net = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 1))
    x = torch.randn(256, 4)
    y = (x.abs().sum(1, keepdim=True) * 2)  # targets need activations well above 0.5
    act.start()
    opt = PACTSGD(net, pact_decay=0.0, lr=0.01, momentum=0.9)
    alpha0 = act.clip_hi.item()
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert act.clip_hi.item() > alpha0 + 1.0  # alpha moved up substantially
    assert losses[-1] < 0.5 * losses[0]


def test_tqt_activation_module_pow2_and_normalised_grad():
    a = PACTUnsignedAct(n_levels=256, init_clip="const", init_clip_hi=5.0, tqt=True, pow2=True)
    a.start()
    s = a.get_eps().item()
    assert s == 2.0 ** -5  # 2^ceil(log2 5) / 2^8 = 8 / 256
    lo, hi = a.get_clip()
    assert lo.item() == 0 and hi.item() == 255 * s
    x = torch.rand(1000) * 12
    torch.testing.assert_close(a(x), s * torch.floor(x / s + 0.5).clamp(0, 255))
    a.zero_grad()
    a(x).sum().backward()
    raw = a.log2_t.grad.item()
    assert abs(raw) > 1.0 and a.tqt_step.item() == 0  # backward leaves the paper's raw gradient
    before = a.log2_t.item()
    plain = copy.deepcopy(a)
    plain.log2_t.grad = a.log2_t.grad.clone()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()  # optimizers know nothing of TQT: the raw gradient ...
    assert plain.tqt_step.item() == 0 and plain.log2_t.item() == pytest.approx(before - 0.1 * raw, rel=1e-6)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    # ... unless normalised before the step: |g| / sqrt(g^2) = 1, then tanh
    assert normalize_tqt_grads(a) == 1
    opt.step()
    assert a.tqt_step.item() == 1
    assert a.log2_t.item() == pytest.approx(before - 0.1 * math.copysign(math.tanh(1.0), raw), rel=1e-6)
    summary = a.quant_summary()
    assert summary["log2_t"] == pytest.approx(a.log2_t.item())


def test_tqt_normalisation_is_amp_loss_scale_invariant_and_survives_deepcopy():
    torch.manual_seed(5)
    x = torch.randn(512) * 3
    steps = []
    for amp in (False, True):
        a = PACTAsymmetricAct(n_levels=16, init_clip="const", init_clip_hi=1.0, tqt=True, tqt_clip_grad=False)
        a.start()
        a = copy.deepcopy(a)  # a copy (e.g. a saved/loaded model) is normalised too
        opt = torch.optim.SGD(a.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=amp)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale((a(x) - 0.5 * x).pow(2).sum()).backward()
            scaler.unscale_(opt)  # the normalisation must see unscaled gradients
            normalize_tqt_grads(a)
            scaler.step(opt)
            scaler.update()
        steps.append(a.log2_t.item())
    assert a.tqt_step.item() == 3
    assert steps[0] == pytest.approx(steps[1], rel=1e-6)
    assert steps[0] != 0.0


def test_tqt_continuous_scale():
    a = PACTAsymmetricAct(n_levels=256, init_clip="const", init_clip_hi=3.0, tqt=True, pow2=False)
    a.start()
    assert a.get_eps().item() == pytest.approx(3.0 / 128)


# ----------------------------------------------------------------------------------------- weights
def test_conv_per_channel_weight_quantization_and_gradients():
    torch.manual_seed(1)
    conv = PACTConv2d(3, 6, 3, padding=1, quantize="per_channel", init_clip="max", learn_clip=True,
                      symm_wts=False, n_levels=16)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1))  # float before start
    conv.start()
    w = conv.weight.detach()
    lo, hi = conv.get_clip_w()
    assert lo.shape == (6,) and torch.equal(hi, w.amax((1, 2, 3))) and torch.equal(lo, w.amin((1, 2, 3)))
    wq = ref_q(w, lo.view(6, 1, 1, 1), hi.view(6, 1, 1, 1), 16)
    torch.testing.assert_close(conv.quantized_weight(), wq)
    torch.testing.assert_close(conv(x), F.conv2d(x, wq, None, 1, 1))
    torch.testing.assert_close(conv.get_eps_w(), (hi - lo) / 15)
    # shrink the bounds so that some weights lie outside, then check the per-channel PACT reductions
    with torch.no_grad():
        conv.clip_hi.mul_(0.5)
        conv.clip_lo.mul_(0.5)
    wq = conv.quantized_weight()
    up = torch.randn_like(wq)
    wq.backward(up)
    hi, lo = conv.clip_hi.detach().view(6, 1, 1, 1), conv.clip_lo.detach().view(6, 1, 1, 1)
    torch.testing.assert_close(conv.clip_hi.grad, (up * (w >= hi)).sum((1, 2, 3), keepdim=True))
    torch.testing.assert_close(conv.clip_lo.grad, (up * (w < lo)).sum((1, 2, 3), keepdim=True))
    torch.testing.assert_close(conv.weight.grad, up * ((w >= lo) & (w < hi)))


def test_conv_sawb_symmetric_per_layer():
    conv = PACTConv2d(8, 8, 3, n_levels=16, init_clip="sawb_asymm")
    conv.start()
    w = conv.weight.detach()
    alpha = 12.06485 * w.pow(2).mean().sqrt() - 11.86833 * w.abs().mean()
    alpha = alpha if alpha > 0 else w.abs().max()
    lo, hi = conv.get_clip_w()
    assert lo.item() == pytest.approx(-alpha.item(), rel=1e-5)
    assert hi.item() == pytest.approx(alpha.item() * 7 / 8, rel=1e-5)  # almost symmetric, n = 16


def test_linear_from_float_and_tqt_pow2_per_channel():
    torch.manual_seed(2)
    lin = nn.Linear(10, 4)
    q = PACTLinear.from_float(lin, n_levels=16, quantize="per_channel", init_clip="max", tqt=True, pow2=True,
                              learn_clip=True)
    x = torch.randn(3, 10)
    torch.testing.assert_close(q(x), lin(x))
    q.start()
    eps = q.get_eps_w()
    assert eps.shape == (4,)
    assert torch.equal(torch.log2(eps), torch.log2(eps).round())
    t = lin.weight.detach().abs().amax(1)
    torch.testing.assert_close(eps, torch.exp2(torch.ceil(torch.log2(t))) / 8)
    q(x).sum().backward()
    assert q.log2_t.grad.shape == (4, 1) and q.weight.grad is not None


def test_conv_from_float_copies_geometry():
    c = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4, bias=True)
    q = PACTConv2d.from_float(c, n_levels=256, quantize="per_channel", init_clip="max")
    assert isinstance(q, nn.Conv2d) and isinstance(q, QuantizerBase)
    assert (q.stride, q.padding, q.groups) == (c.stride, c.padding, c.groups)
    assert torch.equal(q.weight, c.weight) and torch.equal(q.bias, c.bias)
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(q(x), c(x))


def test_weight_edge_cases_zero_and_constant():
    lin = PACTLinear(5, 3, bias=False, n_levels=256, init_clip="sawb_symm")
    with torch.no_grad():
        lin.weight.zero_()
    lin.start()
    assert lin.get_eps_w().item() >= EPS_MIN and torch.isfinite(lin.get_eps_w()).all()
    assert torch.equal(lin.quantized_weight(), torch.zeros(3, 5))
    lin2 = PACTLinear(5, 3, bias=False, n_levels=3, quantize="per_channel", init_clip="max")
    with torch.no_grad():
        lin2.weight.fill_(0.7)
    lin2.start()
    wq = lin2.quantized_weight()
    assert torch.isfinite(wq).all() and torch.isfinite(lin2.get_eps_w()).all()
    assert torch.allclose(wq, torch.full_like(wq, 0.7))  # n = 3: {-m, 0, m}, m = max |w|


# ----------------------------------------------------------------------------------------- adder
def test_integer_add_sync_eps_exact_integer_addition():
    torch.manual_seed(3)
    add = PACTIntegerAdd(n_levels=256, init_clip="max", learn_clip=True, noisy=False, rounding=True,
                         tqt=False)
    x1, x2 = torch.randn(1000), torch.randn(1000) * 3
    add.train()
    add(x1, x2)
    for q in add.quantizers():
        q.start()
    e1, e2 = add.acts[0].get_eps().item(), add.acts[1].get_eps().item()
    assert e2 > e1
    add.sync_eps()
    assert add.acts[0].get_eps().item() == pytest.approx(e2) and add.acts[
        1
    ].get_eps().item() == pytest.approx(e2)
    eps = add.acts[0].get_eps()
    y1, y2 = add.acts[0](x1), add.acts[1](x2)
    c1, c2 = y1 / eps, y2 / eps
    torch.testing.assert_close(c1, c1.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(c2, c2.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(y1 + y2, (c1.round() + c2.round()) * eps)
    # force_out_eps: inputs take the output's eps
    add2 = PACTIntegerAdd(n_levels=256, init_clip="const", force_out_eps=True, init_clip_hi=4.0)
    for q in add2.quantizers():
        q.start()
    with torch.no_grad():
        add2.acts[0].clip_hi.fill_(1.0)
    add2.sync_eps()
    assert add2.acts[0].get_eps().item() == pytest.approx(add2.act_out.get_eps().item())
    with pytest.raises(TypeError, match="expects 2 inputs"):
        add2(x1)


def test_integer_add_tqt_pow2_sync():
    add = PACTIntegerAdd(n_levels=256, init_clip="const", tqt=True, pow2=True)
    for q in add.quantizers():
        q.start(init_clip_hi=3.0)
    with torch.no_grad():
        add.acts[1].log2_t.fill_(3.2)
    add.sync_eps()
    assert add.acts[0].get_eps().item() == add.acts[1].get_eps().item() == 2.0 ** 4 / 128


# ----------------------------------------------------------------------------------------- state, errors
def test_state_dict_round_trip():
    torch.manual_seed(4)
    net = nn.Sequential(PACTConv2d(3, 4, 3, quantize="per_channel"), PACTUnsignedAct(init_clip="max"),
                        PACTIntegerAdd(n_levels=16))
    x = torch.randn(2, 3, 6, 6)
    net.train()
    h = net[1](net[0](x))
    net[2](h, h)
    net[0].start()
    net[1].start()
    net[1].freeze()
    sd = net.state_dict()
    net2 = nn.Sequential(PACTConv2d(3, 4, 3, quantize="per_channel"), PACTUnsignedAct(init_clip="max"),
                         PACTIntegerAdd(n_levels=16))
    net2.load_state_dict(sd)
    assert net2[0].started and net2[1].started and net2[1].frozen and not net2[2].acts[0].started
    net.eval()
    net2.eval()
    torch.testing.assert_close(net2[1](net2[0](x)), net[1](net[0](x)))
    assert quant_summaries(net2) == quant_summaries(net)


def test_quant_summaries_json():
    net = nn.Sequential(PACTConv2d(3, 4, 1, quantize="per_channel", tqt=True), PACTUnsignedAct(),
                        PACTIntegerAdd(), PACTLinear(4, 2))
    s = quant_summaries(net)
    assert set(s) == {"0", "1", "2.acts.0", "2.acts.1", "2.act_out", "3"}
    assert {"lo", "hi", "eps", "n_levels", "log2_t", "hi_min", "hi_max"} <= set(s["0"])
    json.dumps(s)


@pytest.mark.parametrize("ctor", [
    lambda **k: PACTUnsignedAct(**k), lambda **k: PACTAsymmetricAct(**k),
    lambda **k: PACTConv2d(2, 2, 1, **k), lambda **k: PACTLinear(2, 2, **k), lambda **k: PACTIntegerAdd(**k),
])
def test_constructor_errors(ctor):
    with pytest.raises(TypeError, match="bogus_key"):
        ctor(bogus_key=1)
    with pytest.raises(ValueError, match="n_levels.*1"):
        ctor(n_levels=1)
    with pytest.raises(ValueError, match="allowed"):
        ctor(init_clip="nope")
    with pytest.raises(ValueError, match="tqt"):
        ctor(pow2=True)


def test_other_value_errors():
    with pytest.raises(ValueError, match="per_layer, per_channel"):
        PACTConv2d(2, 2, 1, quantize="per_tensor")
    with pytest.raises(ValueError, match="act_kind.*relu6"):
        PACTUnsignedAct(act_kind="gelu")
    with pytest.raises(ValueError, match="n_levels.*2.5"):
        PACTUnsignedAct(n_levels=2.5)


def test_pactsgd_decays_clip_params_only():
    net = nn.Sequential(PACTLinear(3, 3, learn_clip=True), PACTUnsignedAct(), PACTAsymmetricAct(tqt=True))
    opt = PACTSGD(net, pact_decay=0.1, lr=1.0, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        b = before[n]
        if n.endswith("clip_hi") or n.endswith("clip_lo"):
            torch.testing.assert_close(p.detach(), b * (1 - 0.1))
        elif n.endswith("log2_t"):
            torch.testing.assert_close(p.detach(), b)
        else:
            torch.testing.assert_close(p.detach(), b * (1 - 0.01))
    names = {n for n, _ in net.named_parameters()}
    assert {"0.clip_hi", "1.clip_hi", "2.log2_t", "0.weight", "0.bias"} == names
    adam = PACTAdam(net, pact_decay=1e-3, lr=1e-3, weight_decay=1e-4)
    assert sorted(g["weight_decay"] for g in adam.param_groups) == [0.0, 1e-4, 1e-3]
