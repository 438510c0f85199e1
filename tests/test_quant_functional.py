"""Fake-quantization autograd functions against the direct formulas (facts §3)."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.quant.functional import (
    EPS_MIN,
    normalize_tqt_grad,
    pact_quantize,
    tqt_code_range,
    tqt_quantize,
    tqt_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")



def ref_pact(x, lo, hi, n, rounding=True):
    eps = (hi - lo) / (n - 1)
    z = (torch.minimum(torch.maximum(x, lo), hi) - lo) / eps
    return lo + eps * (torch.floor(z + 0.5) if rounding else torch.floor(z))


@pytest.mark.parametrize("n", [2, 3, 16, 255, 256])
@pytest.mark.parametrize("rounding", [True, False])
def test_pact_forward_matches_formula(n, rounding):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4000, dtype=torch.float64, generator=g) * 2
    lo, hi = torch.tensor(-1.3, dtype=torch.float64), torch.tensor(2.1, dtype=torch.float64)
    q = pact_quantize(x, lo, hi, n, rounding)
    torch.testing.assert_close(q, ref_pact(x, lo, hi, n, rounding), rtol=0, atol=1e-12)
    codes = (q - lo) / ((hi - lo) / (n - 1))
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert codes.min() >= 0 and codes.max() <= n - 1
    assert q.min() == lo and q.max() == pytest.approx(float(hi))


def test_pact_backward_closed_form_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, generator=g) * 3).requires_grad_()
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    up = torch.randn(3000, generator=g)
    pact_quantize(x, lo, hi, 16).backward(up)
    xd = x.detach()
    inside = (xd >= -1.0) & (xd < 2.0)
    torch.testing.assert_close(x.grad, up * inside)
    torch.testing.assert_close(hi.grad, up[xd >= 2.0].sum())
    torch.testing.assert_close(lo.grad, up[xd < -1.0].sum())
    assert inside.any() and (xd >= 2).any() and (xd < -1).any()


def test_pact_backward_per_channel_reduction():
    g = torch.Generator().manual_seed(1)
    c = 5
    w = (torch.randn(c, 3, 3, 3, generator=g)).requires_grad_()
    lo = (-torch.rand(c, 1, 1, 1, generator=g) - 0.2).requires_grad_()
    hi = (torch.rand(c, 1, 1, 1, generator=g) + 0.2).requires_grad_()
    up = torch.randn_like(w)
    pact_quantize(w, lo, hi, 7).backward(up)
    wd = w.detach()
    for k in range(c):  # loop only in the test, as the reference for the vectorised reduction
        above = wd[k] >= hi[k].detach()
        below = wd[k] < lo[k].detach()
        assert hi.grad[k].item() == pytest.approx(up[k][above].sum().item(), abs=1e-5)
        assert lo.grad[k].item() == pytest.approx(up[k][below].sum().item(), abs=1e-5)
    assert hi.grad.shape == hi.shape and lo.grad.shape == lo.shape
    inside = (wd >= lo.detach()) & (wd < hi.detach())
    torch.testing.assert_close(w.grad, up * inside)


def test_pact_edge_cases_zero_range_and_constant():
    x = torch.zeros(10, requires_grad=True)
    lo = torch.tensor(0.0, requires_grad=True)
    hi = torch.tensor(0.0, requires_grad=True)
    q = pact_quantize(x, lo, hi, 256)
    assert torch.isfinite(q).all() and (q == 0).all()
    q.sum().backward()
    assert torch.isfinite(hi.grad) and torch.isfinite(lo.grad)
    # constant input on a real grid: exact
    xc = torch.full((7,), 0.5)
    assert torch.equal(pact_quantize(xc, torch.tensor(0.0), torch.tensor(1.0), 2), torch.ones(7))
    # n_levels = 2: two levels {lo, hi}
    x2 = torch.tensor([-5.0, -0.1, 0.1, 0.49, 0.51, 5.0])
    q2 = pact_quantize(x2, torch.tensor(0.0), torch.tensor(1.0), 2)
    assert q2.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_pact_nan_input_defined():
    x = torch.tensor([float("nan"), -3.0, 0.3, 3.0], requires_grad=True)
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    q = pact_quantize(x, lo, hi, 256)
    assert torch.isnan(q[0]) and torch.isfinite(q[1:]).all()
    q.backward(torch.ones(4))
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 0.0]  # NaN: no gradient
    assert lo.grad.item() == 1.0 and hi.grad.item() == 1.0  # NaN contributes to neither bound


def test_pact_half_input_keeps_dtype():
    x = torch.randn(100).half()
    q = pact_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 16)
    assert q.dtype == torch.float16
    torch.testing.assert_close(q.float(), ref_pact(x.float(), torch.tensor(-1.0), torch.tensor(1.0), 16),
                               rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------------ TQT
def ref_tqt(x, log2_t, n_levels, signed, pow2):
    n, p, _ = tqt_code_range(n_levels, signed)
    # t = -lo (signed), t = hi (unsigned, continuous: the reference's step t / (N - 1)), the paper's 2^b with
    # pow2
    d = n_levels // 2 if signed else (n_levels if pow2 else n_levels - 1)
    s = 2.0 ** math.ceil(log2_t - math.log2(d)) if pow2 else 2.0 ** log2_t / d
    c = torch.floor(x / s + 0.5)
    return s * c.clamp(n, p), s, c, n, p


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("n_levels", [16, 256, 255])
def test_tqt_forward_and_backward_closed_form(signed, pow2, n_levels):
    g = torch.Generator().manual_seed(n_levels + 2 * signed + pow2)
    x = (torch.randn(5000, dtype=torch.float64, generator=g) * 1.5).requires_grad_()
    t0 = 0.37 if signed else 1.73
    log2_t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5000, dtype=torch.float64, generator=g)
    q = tqt_quantize(x, log2_t, n_levels, signed, pow2)
    qr, s, c, n, p = ref_tqt(x.detach(), t0, n_levels, signed, pow2)
    torch.testing.assert_close(q.detach(), qr, rtol=0, atol=1e-12)
    q.backward(up)
    inside = (c >= n) & (c <= p)
    torch.testing.assert_close(x.grad, up * inside)
    xs = x.detach() / s
    local = torch.where(inside, c - xs, torch.where(c < n, torch.full_like(xs, n), torch.full_like(xs, p)))
    expect = (up * local * s * math.log(2)).sum()
    assert log2_t.grad.item() == pytest.approx(expect.item(), rel=1e-9, abs=1e-12)
    assert (c < n).any() or not signed  # the test covers the below region for signed grids
    assert (c > p).any()


def test_tqt_pow2_scales_exact_powers_of_two_paper_formula():
    for b in (2, 4, 8):
        n_levels = 2 ** b
        for log2_t in (-3.7, -0.2, 0.0, 0.4, 2.5, 3.0):
            lt = torch.tensor(log2_t)
            s_signed = tqt_scale(lt, n_levels, signed=True, pow2=True).item()
            s_unsigned = tqt_scale(lt, n_levels, signed=False, pow2=True).item()
            assert math.log2(s_signed) == round(math.log2(s_signed))
            assert math.log2(s_unsigned) == round(math.log2(s_unsigned))
            # paper: s = 2^ceil(log2 t) / 2^(b-1) (signed) or / 2^b (unsigned)
            assert s_signed == 2.0 ** math.ceil(log2_t) / 2 ** (b - 1)
            assert s_unsigned == 2.0 ** math.ceil(log2_t) / 2 ** b
    # continuous variant (reference library): s = 2^log2_t / D, not a power of two in general
    s = tqt_scale(torch.tensor(0.4), 256, signed=True, pow2=False).item()
    assert s == pytest.approx(2 ** 0.4 / 128)
    s = tqt_scale(torch.tensor(0.4), 256, signed=False, pow2=False).item()
    assert s == pytest.approx(2 ** 0.4 / 255)  # unsigned: hi = t


def test_tqt_per_channel_log2t_gradient_reduction():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, dtype=torch.float64, generator=g).requires_grad_()
    log2_t = torch.tensor([[-1.0], [0.0], [0.5], [1.0]], dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 50, dtype=torch.float64, generator=g)
    tqt_quantize(x, log2_t, 16, True, False).backward(up)
    for k in range(4):
        lt = log2_t[k, 0].item()
        xk = x[k:k + 1].detach().clone().requires_grad_()
        tk = torch.tensor(lt, dtype=torch.float64, requires_grad=True)
        tqt_quantize(xk, tk, 16, True, False).backward(up[k:k + 1])
        assert log2_t.grad[k, 0].item() == pytest.approx(tk.grad.item(), rel=1e-12)


def test_tqt_gradient_normalisation_adam_like():
    var, step = torch.zeros(()), torch.zeros(())
    beta = 0.9
    gs = [torch.tensor(3.0), torch.tensor(-0.5), torch.tensor(1e-4)]
    v = 0.0
    for k, gk in enumerate(gs, start=1):
        out = normalize_tqt_grad(gk, var, step, beta, clip_grad=False)
        v = beta * v + (1 - beta) * gk.item() ** 2
        expect = gk.item() / (math.sqrt(v / (1 - beta ** k)) + 1e-12)
        assert out.item() == pytest.approx(expect, rel=1e-5)
        assert var.item() == pytest.approx(v, rel=1e-5) and step.item() == k
    out = normalize_tqt_grad(torch.tensor(50.0), var, step, beta, clip_grad=True)
    assert 0 < out.item() < 1  # tanh-bounded
    # a non-finite gradient passes through and leaves the state alone
    v_before, k_before = var.clone(), step.clone()
    out = normalize_tqt_grad(torch.tensor(float("inf")), var, step, beta, clip_grad=True)
    assert math.isinf(out.item()) and torch.equal(var, v_before) and torch.equal(step, k_before)


def test_tqt_nan_input_defined():
    x = torch.tensor([float("nan"), 0.3, 100.0], requires_grad=True)
    log2_t = torch.tensor(0.0, requires_grad=True)
    q = tqt_quantize(x, log2_t, 256, True, False)
    assert torch.isnan(q[0]) and torch.isfinite(q[1:]).all()
    q.backward(torch.ones(3))
    assert x.grad.tolist() == [0.0, 1.0, 0.0]
    assert torch.isfinite(log2_t.grad)


def test_eps_floor_constant():
    assert 0 < EPS_MIN < 1e-6


@pytest.mark.parametrize("algorithm", ["pact", "tqt"])
@pytest.mark.parametrize("bound_shape", [(), (1, 6, 1, 1)], ids=["per-tensor", "per-channel"])
def test_channels_last_batches_give_the_contiguous_results(algorithm, bound_shape):
    """An NHWC batch (what training feeds with ``training.channels_last``) stays NHWC and gives the NCHW
    batch's output and x gradient bit for bit; the bound gradients sum the same terms in another order."""
    g = torch.Generator().manual_seed(3)
    x, upstream = torch.randn(4, 6, 5, 7, generator=g) * 2, torch.randn(4, 6, 5, 7, generator=g)

    def run(memory_format):
        xin = x.clone(memory_format=memory_format).requires_grad_()
        if algorithm == "pact":
            bounds = (torch.full(bound_shape, -1.1, requires_grad=True),
                      torch.full(bound_shape, 2.3, requires_grad=True))
            q = pact_quantize(xin, *bounds, 16)
        else:
            bounds = (torch.full(bound_shape, 1.2, requires_grad=True),)
            q = tqt_quantize(xin, *bounds, 16, signed=True)
        q.backward(upstream.contiguous(memory_format=memory_format))
        return q, xin.grad, [b.grad for b in bounds]

    q, gx, gb = run(torch.contiguous_format)
    q_nhwc, gx_nhwc, gb_nhwc = run(torch.channels_last)
    assert q_nhwc.is_contiguous(memory_format=torch.channels_last) and not q_nhwc.is_contiguous()
    assert torch.equal(q_nhwc, q) and torch.equal(gx_nhwc, gx)
    for a, b in zip(gb_nhwc, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
