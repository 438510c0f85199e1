"""The fused fake-quant kernels against the unfused reference formulas (facts §3), the batched TQT gradient
normalisation against the per-quantizer one, and a smoke run of bench/qat_step.py (no timing assertions)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from labkit.quant import PACTConv2d, PACTUnsignedAct, normalize_tqt_grads
from labkit.quant import functional as qf
from labkit.quant.optimizers import _normalize_many

from helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_pact(x, lo, hi, n, rounding, g):
    """Unfused: output, dL/dx, dL/dlo, dL/dhi (sums per bound element)."""
    eps = torch.clamp((hi - lo) / (n - 1), min=qf.EPS_MIN)
    hi = torch.maximum(hi, lo + qf.EPS_MIN * (n - 1))
    z = (torch.minimum(torch.maximum(x, lo), hi) - lo) / eps
    q = lo + eps * (torch.floor(z + 0.5) if rounding else torch.floor(z))
    below, above = x < lo, x >= hi
    inside = ~below & ~above & ~torch.isnan(x)
    return q, g * inside, (g * below).sum_to_size(lo.shape), (g * above).sum_to_size(hi.shape)


def ref_tqt(x, log2_t, n_levels, signed, pow2, g):
    n, p, _ = qf.tqt_code_range(n_levels, signed)
    s = qf.tqt_scale(log2_t, n_levels, signed, pow2)
    z = x / s
    c = torch.floor(z + 0.5)
    inside = (c >= n) & (c <= p)
    local = torch.where(inside, c - z, torch.where(c < n, float(n), torch.where(c > p, float(p), 0.0)))
    return s * c.clamp(n, p), g * inside, (g * local * s * math.log(2)).sum_to_size(log2_t.shape)


def _pact_case(dtype, per_channel, signed):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, 7, 7, generator=gen, dtype=dtype) * 2
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    shape = (6, 1, 1, 1) if per_channel else ()
    hi = torch.rand(shape, generator=gen, dtype=dtype) + 0.5
    lo = -torch.rand(shape, generator=gen, dtype=dtype) - 0.3 if signed else torch.zeros(shape, dtype=dtype)
    x[1, 0, 0, 0] = hi.reshape(-1)[0]  # exactly on the upper bound: "above"
    x[1, 0, 0, 1] = lo.reshape(-1)[0]  # exactly on the lower bound: "inside"
    return x, lo, hi, torch.randn(x.shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rounding", [True, False])
@pytest.mark.parametrize("scalar_path", [True, False])
def test_fused_pact_equals_reference(dtype, per_channel, signed, rounding, scalar_path, monkeypatch):
    if not scalar_path:  # force the tensor-bound path (the one accelerators take) on CPU
        monkeypatch.setattr(qf, "_cpu_scalar", lambda *a: False)
    x, lo, hi, g = _pact_case(dtype, per_channel, signed)
    xr, lor, hir = (t.clone().requires_grad_() for t in (x, lo, hi))
    q = qf.pact_quantize(xr, lor, hir, 256, rounding)
    q.backward(g)
    q_ref, gx_ref, glo_ref, ghi_ref = ref_pact(x, lo, hi, 256, rounding, g)
    assert torch.equal(torch.nan_to_num(q.detach(), nan=-7.0), torch.nan_to_num(q_ref, nan=-7.0))
    assert torch.equal(xr.grad, torch.nan_to_num(gx_ref))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hir.grad, ghi_ref, **tol)
    torch.testing.assert_close(lor.grad, glo_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_tqt_equals_reference(dtype, signed, pow2, per_channel):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 9, 9, generator=gen, dtype=dtype) * 2
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    shape = (4, 1, 1, 1) if per_channel else ()
    log2_t = torch.rand(shape, generator=gen, dtype=dtype) * 0.5 + 0.2
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    xr, tr = x.clone().requires_grad_(), log2_t.clone().requires_grad_()
    q = qf.tqt_quantize(xr, tr, 16, signed, pow2)
    q.backward(g)
    q_ref, gx_ref, gt_ref = ref_tqt(x, log2_t, 16, signed, pow2, g)
    finite = torch.isfinite(x)
    assert torch.equal(q.detach()[finite], q_ref[finite]) and torch.isnan(q.detach()[0, 0, 0, 0])
    assert torch.equal(xr.grad, torch.nan_to_num(gx_ref))
    # reference with the non-finite inputs removed from the threshold sum (NaN: no gradient; +-inf: p / n)
    xs = x.clone()
    xs[0, 0, 0, :3] = 0.0
    _, _, gt_fin = ref_tqt(xs, log2_t, 16, signed, pow2, g)
    n, p, _ = qf.tqt_code_range(16, signed)
    s = qf.tqt_scale(log2_t, 16, signed, pow2)
    extra = torch.zeros(x.shape, dtype=dtype)
    extra[0, 0, 0, 1], extra[0, 0, 0, 2] = p * g[0, 0, 0, 1], n * g[0, 0, 0, 2]
    expect = gt_fin + (extra * s * math.log(2)).sum_to_size(log2_t.shape)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(tr.grad, expect, **tol)


def test_forward_without_autograd_is_the_same_kernel():
    x = torch.randn(2, 3, 5, 5) * 2
    lo, hi, t = torch.tensor(-1.0), torch.tensor(1.5, requires_grad=True), torch.tensor(0.4,
                                                                                        requires_grad=True)
    with torch.no_grad():
        plain = [qf.pact_quantize(x, lo, hi, 256), qf.pact_quantize(x, 0.0, hi, 16),
                 qf.tqt_quantize(x, t, 256, True)]
    tracked = [qf.pact_quantize(x, lo, hi, 256), qf.pact_quantize(x, 0.0, hi, 16),
               qf.tqt_quantize(x, t, 256, True)]
    assert all(q.grad_fn is not None for q in tracked) and all(q.grad_fn is None for q in plain)
    assert all(torch.equal(a, b.detach()) for a, b in zip(plain, tracked))


def test_half_input_fused_matches_float():
    x = torch.randn(3, 4, 5, 5)
    lo, hi = torch.tensor(0.0), torch.tensor(1.5, requires_grad=True)
    xh = x.half().requires_grad_()
    q = qf.pact_quantize(xh, lo, hi, 256)
    assert q.dtype == torch.float16
    q.float().sum().backward()
    assert xh.grad.dtype == torch.float16 and hi.grad.dtype == torch.float32
    q32 = qf.pact_quantize(x.half().float(), lo, hi.detach(), 256)
    torch.testing.assert_close(q.float(), q32, rtol=0, atol=2e-3)


def test_batched_tqt_normalisation_equals_per_quantizer():
    torch.manual_seed(0)
    mods = [PACTConv2d(4, 6, 3, tqt=True, learn_clip=True, quantize="per_channel"), PACTUnsignedAct(tqt=True),
            PACTUnsignedAct(tqt=True), PACTConv2d(3, 5, 1, tqt=True, learn_clip=True)]
    ref = copy.deepcopy(mods)
    for k in range(4):
        for a, b in zip(mods, ref):
            grad = torch.randn_like(a.log2_t) * 10.0 ** (k - 2)
            if k == 2 and a is mods[0]:
                grad.view(-1)[0] = float("nan")  # this quantizer's state stays; the others go on
            a.log2_t.grad, b.log2_t.grad = grad.clone(), grad.clone()
        _normalize_many(mods, 0.9, True)
        for b in ref:  # the formula, one quantizer at a time
            b.log2_t.grad.copy_(qf.normalize_tqt_grad(b.log2_t.grad, b.tqt_var, b.tqt_step, 0.9, True))
        for a, b in zip(mods, ref):
            torch.testing.assert_close(a.log2_t.grad, b.log2_t.grad, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(a.tqt_var, b.tqt_var) and torch.equal(a.tqt_step, b.tqt_step)
    assert [m.tqt_step.item() for m in mods] == [3.0, 4.0, 4.0, 4.0]


def test_network_normalisation_covers_all_tqt_layers_once():
    torch.manual_seed(1)
    net = torch.nn.Sequential(PACTConv2d(3, 4, 3, tqt=True, learn_clip=True, quantize="per_channel"),
                              PACTUnsignedAct(tqt=True, init_clip="const"))
    for m in net:
        m.start()
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 6)
    for model in (net, ref):
        model(x).sum().backward()
    for m in ref:
        m.log2_t.grad.copy_(qf.normalize_tqt_grad(m.log2_t.grad, m.tqt_var, m.tqt_step, 0.9, True))
    assert normalize_tqt_grads(net) == 2  # batched, one call per optimizer step
    for a, b in zip(net, ref):
        torch.testing.assert_close(a.log2_t.grad, b.log2_t.grad, rtol=0, atol=0)
        assert a.tqt_step.item() == 1.0


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    try:
        x = (torch.randn(2, 3, 5, 5) * 2).requires_grad_()
        lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
        t = torch.tensor(0.4, requires_grad=True)
        g = torch.randn(2, 3, 5, 5)
        outs = []
        for enable in (False, True):
            with qf.compiled_kernels(enable):
                q = qf.pact_quantize(x, lo, hi, 256) + qf.tqt_quantize(x, t, 256, True)
                q.backward(g)
            outs.append([q.detach(), x.grad, lo.grad, hi.grad, t.grad])
            x.grad = lo.grad = hi.grad = t.grad = None
    except Exception as err:  # no inductor backend / compiler on this machine
        pytest.skip(f"torch.compile unavailable: {type(err).__name__}: {err}")
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "qat_step.py"), "--quick", "--output",
                           str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] and data["cases"]
    variants = data["cases"][0]["variants"]
    assert set(variants) == {"fp32", "pact", "tqt", "torchao"}
    for rec in variants.values():
        assert rec["median_s"] > 0 and math.isfinite(rec["ratio"])
        assert rec["memory"]["rss_peak_mb"] > 0 and rec["memory"]["saved_mb"] > 0
    assert set(data["targets"]) == {"pact", "tqt"}
