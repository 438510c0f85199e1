"""Per-layer sensitivity: the documented loss increase, measured by partial re-runs that equal full forward
passes; the second-order (Fisher) measure against its formula written out image by image; the cache beside
the checkpoint (hit, miss on a changed checkpoint); errors; the heat map."""

import json

import pytest
import torch
from torch import nn

from labkit.config.loading import load_config
from labkit.config.schema import ConfigError
from labkit.lab.plots import plot_sensitivity
from labkit.precision.sensitivity import (
    CACHE,
    CLIP_GRID,
    RULES,
    cache_key,
    calibration_batch,
    float_weights_network,
    measure,
    measure_fisher,
    measure_sensitivity,
)
from labkit.quant import PACTIntegerAdd, pact_quantize
from labkit.train.build import build_float_network, build_network
from labkit.train.checkpoint import CheckpointError, make_checkpoint, save_atomic

from helpers import ROOT, SMALL_INPUT, SmallNet, small_plan, small_qnet

PACT4 = ROOT / "configs" / "embedded" / "config.pact.4b.json"
#: the small network's activation groups and their quantizers
GROUPS = {"act1": ["act1"], "act3": ["act3", "pool_act"],
          "integer_add": ["integer_add.acts.0", "integer_add.acts.1", "integer_add.act_out"]}


def ce(net, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(net(x), y))


def small_case():
    """The small network in float64 (so that batch sums in another order agree to 1e-12) and random data."""
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        net.fc.weight.mul_(20)  # logits large enough for quantization to move the loss
    qnet = small_qnet(net).eval()
    plan = small_plan(qnet)
    return qnet.double(), plan, torch.randn(24, *SMALL_INPUT[1:], dtype=torch.float64), torch.randint(0, 3,
                                                                                                      (24,))


def mse_clip_reference(module, values: torch.Tensor, n_levels: int) -> float:
    """The documented search, written out: clips k/CLIP_GRID of max |value| on the PACT grids
    (unsigned [0, hi], eps = hi/(n-1); signed almost-symmetric: lo = -m, eps = m/(n/2), hi = lo + (n-1)
    eps)."""
    best = (float("inf"), None)
    for k in range(1, CLIP_GRID + 1):
        if module.signed:
            m = float(values.abs().max()) * k / CLIP_GRID
            lo, hi = -m, -m + (n_levels - 1) * m / (n_levels // 2)
        else:
            m = float(values.max()) * k / CLIP_GRID
            lo, hi = 0.0, m
        lo, hi = torch.tensor(lo, dtype=values.dtype), torch.tensor(hi, dtype=values.dtype)
        err = float(((pact_quantize(values, lo, hi, n_levels) - values) ** 2).mean())
        best = min(best, (err, m), key=lambda t: t[0])
    return best[1]


def reference_increase(qnet, quantizers: list[str], n_levels: int, x, y) -> float:
    """Loss increase with only ``quantizers`` started at their MSE clips (full forward passes)."""
    modules = dict(qnet.named_modules())
    seen = {}
    hooks = [modules[q].register_forward_hook(lambda m, i, o,
                                              q=q: seen.__setitem__(q, o.detach().reshape(-1)))
             for q in quantizers]
    base = ce(qnet, x, y)
    for h in hooks:
        h.remove()
    for q in quantizers:
        m = mse_clip_reference(modules[q], seen[q], n_levels)
        modules[q].spec = modules[q].spec.replace(n_levels=n_levels, init_clip="const", init_clip_lo=-m,
                                                  init_clip_hi=m)
        modules[q].stop()
        modules[q].start()
    for adder in (m for m in modules.values() if isinstance(m, PACTIntegerAdd)):
        if all(a.started for a in adder.acts):
            adder.sync_eps()
    increase = ce(qnet, x, y) - base
    for q in quantizers:
        modules[q].stop()
    return increase


def test_sensitivity_is_the_loss_increase_of_one_quantized_layer_or_group():
    qnet, plan, x, y = small_case()
    # 2 batches: partial re-runs
    base, weights, acts = measure(qnet, plan, x, y, bits=(2, 3, 8), batch_size=12)
    assert base == pytest.approx(ce(qnet, x, y), rel=1e-12)
    assert list(weights) == ["conv1", "conv2", "conv3", "fc"] and set(acts) == {"act1", "integer_add", "act3"}
    modules = dict(qnet.named_modules())
    for layer in weights:  # weights: the config's own rule at 2**b levels, nothing else quantized
        for b in (2, 3, 8):
            m = modules[layer]
            m.spec = m.spec.replace(n_levels=2 ** b)
            m.start()
            assert weights[layer][b] == pytest.approx(ce(qnet, x, y) - base, rel=1e-9, abs=1e-12), (layer, b)
            m.stop()
    # activation groups: the quantizer with its MSE-optimal clip; the adder's inputs and output (one eps for
    # the inputs); act3 together with the pool requantizer that follows it
    for group, quantizers in GROUPS.items():  # (set_eps keeps a step in float32: agreement to ~1e-6)
        for b in (2, 3):
            assert acts[group][b] == pytest.approx(reference_increase(qnet, quantizers, 2 ** b, x, y),
                                                   rel=1e-4, abs=1e-8), (group, b)
    assert all(not m.started for _, m in qnet.named_modules() if hasattr(m, "started"))  # left in float
    # fewer bits perturb the loss more (in size: on this small random network some increases are negative)
    size = {b: sum(abs(weights[n][b]) for n in weights) for b in (2, 3, 8)}
    assert size[2] > size[3] > 10 * size[8]


def per_image_squared_gradients(qnet, x, y, of) -> list[torch.Tensor]:
    """``sum_x (d CE(x) / d v)^2`` for each tensor ``v`` that ``of()`` returns after one image's forward pass,
    one image at a time."""
    total = None
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(qnet(x[i:i + 1]), y[i:i + 1])
        grads = [g.square() for g in torch.autograd.grad(loss, of())]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    return total


def test_fisher_sensitivity_is_half_the_fisher_weighted_squared_quantization_error():
    qnet, plan, x, y = small_case()
    base, weights, acts = measure_fisher(qnet, plan, x, y, bits=(2, 3, 8), batch_size=10)
    assert base == pytest.approx(ce(qnet, x, y), rel=1e-12)
    assert list(weights) == ["conv1", "conv2", "conv3", "fc"] and set(acts) == {"act1", "integer_add", "act3"}
    modules = dict(qnet.named_modules())
    layers = [modules[n] for n in weights]
    fisher = per_image_squared_gradients(qnet, x, y, lambda: [m.weight for m in layers])
    for name, m, f in zip(weights, layers, fisher):
        for b in (2, 3, 8):
            m.spec = m.spec.replace(n_levels=2 ** b)
            m.start()
            error = (m.quantized_weight() - m.weight).detach()
            m.stop()
            assert weights[name][b] == pytest.approx(float((f * error ** 2).sum()) / (2 * len(x)), rel=1e-9)
    # activations: each image's gradient at the quantizer's output (one image per pass), the error of the
    # quantizer at its MSE-optimal clip, summed over the group
    for group, quantizers in GROUPS.items():
        for b in (2, 3):
            expected = reference_fisher(qnet, quantizers, 2 ** b, x, y)
            assert acts[group][b] == pytest.approx(expected, rel=1e-4), (group, b)
    assert all(not m.started for _, m in qnet.named_modules() if hasattr(m, "started"))  # left in float
    # the second-order estimates shrink with the squared step: ~4x per bit
    assert all(weights[n][2] > weights[n][3] > 100 * weights[n][8] for n in weights)


def reference_fisher(qnet, quantizers: list[str], n_levels: int, x, y) -> float:
    """``1/2 mean_x sum_j g_j(x)^2 (Q(v_j) - v_j)^2`` over the outputs ``v`` of ``quantizers``, the gradients
    from one image per pass, Q with the quantizers started at their MSE clips (adder inputs on one eps)."""
    modules = dict(qnet.named_modules())
    stored = []
    for i in range(len(x)):
        outputs: dict[str, torch.Tensor] = {}
        hooks = [modules[q].register_forward_hook(lambda m, inp, o, q=q, seen=outputs: seen.__setitem__(q, o))
                 for q in quantizers]
        loss = nn.functional.cross_entropy(qnet(x[i:i + 1]), y[i:i + 1])
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, [outputs[q] for q in quantizers])
        stored.append({q: (outputs[q].detach(), g) for q, g in zip(quantizers, grads)})
    for q in quantizers:
        m = mse_clip_reference(modules[q], torch.cat([s[q][0].reshape(-1) for s in stored]), n_levels)
        modules[q].spec = modules[q].spec.replace(n_levels=n_levels, init_clip="const", init_clip_lo=-m,
                                                  init_clip_hi=m)
        modules[q].stop()
        modules[q].start()
    for adder in (m for m in modules.values() if isinstance(m, PACTIntegerAdd)):
        if all(a.started for a in adder.acts):
            adder.sync_eps()
    with torch.no_grad():
        total = sum(float((g ** 2 * (modules[q].fake_quant(v) - v) ** 2).sum()) for s in stored
                    for q, (v, g) in s.items())
    for q in quantizers:
        modules[q].stop()
    return total / (2 * len(x))


def test_in_place_modules_are_refused():
    qnet, plan, x, y = small_case()
    qnet.get_submodule("bn1").inplace = True  # as if a module wrote into its input
    with pytest.raises(ValueError, match="'bn1' works in place"):
        measure(qnet, plan, x, y, bits=(2,))


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """An embedded FP32 checkpoint with random weights (BN statistics from a few images, larger logits)."""
    cfg = load_config(PACT4, {"network.pretrained": None})
    torch.manual_seed(0)
    net = build_float_network(cfg)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics: the average over the batches seen
    with torch.no_grad():
        net.train()(calibration_batch(cfg["data"], 16)[0])
        net.classifier[1].weight.mul_(30)
    folder = tmp_path_factory.mktemp("fp32")
    save_atomic(make_checkpoint(net.state_dict(), {"class": "MobileNetV2",
                                                   "kwargs": cfg["network"]["kwargs"]}),
                folder / "best.ckpt")
    return cfg, folder


def test_measure_sensitivity_caches_beside_the_checkpoint(random_run, one_thread):
    cfg, folder = random_run
    # entries of other bits, another calibration size and other quantizer settings (same checkpoint): never
    # used
    other_settings = json.loads(json.dumps(cfg))
    other_settings["network"]["quantize"]["PACTUnsignedAct"]["kwargs"]["n_levels"] = 8
    # and this very entry as measured under older quantizer rules
    older_rules = cache_key(cfg, folder / "best.ckpt", (2,), 2).replace(f"rules={RULES}|",
                                                                        f"rules={RULES - 1}|")
    stale = [cache_key(cfg, folder / "best.ckpt", (2, 3), 2), cache_key(cfg, folder / "best.ckpt", (2,), 3),
             cache_key(other_settings, folder / "best.ckpt", (2,), 2), older_rules]
    poisoned = {"bits": [2], "n_calib": 2, "base_loss": -1.0, "weights": {}, "activations": {},
                "checkpoint": "x"}
    (folder / CACHE).write_text(json.dumps({k: {**poisoned, "key": k} for k in stale}))
    first = measure_sensitivity(cfg, folder, bits=(2,), n_calib=2)
    assert not first.cached and first.checkpoint == str(folder / "best.ckpt") and first.base_loss > 0
    assert first.key not in stale and len(set(stale)) == 4
    assert len(first.weights) == 53 and len(first.activations) == 52  # 53 - the pool requantizer, a follower
    again = measure_sensitivity(cfg, folder / "best.ckpt", bits=(2,), n_calib=2)
    assert again.cached and again == first
    stored = json.loads((folder / CACHE).read_text())
    assert list(stored) == [*stale,
                            first.key] and first.key.startswith(f"loss|rules={RULES}|bits=2|n=2|ckpt=")
    # another checkpoint in the same place: a new key, the stale entry is never used
    state = torch.load(folder / "best.ckpt", weights_only=True)
    state["state_dict"]["classifier.1.weight"].mul_(0.5)
    save_atomic(state, folder / "best.ckpt")
    changed = measure_sensitivity(cfg, folder, bits=(2,), n_calib=2)
    assert not changed.cached and changed.key != first.key and changed.base_loss != first.base_loss
    assert len(json.loads((folder / CACHE).read_text())) == 6
    assert "sensitivity (loss" in changed.summary() and len(changed.table()) == 105
    fig = plot_sensitivity(changed)
    assert len(fig.axes) == 3 and len(fig.axes[0].get_yticklabels()) == 53  # two heat maps and a colour bar


def test_a_qat_checkpoint_gives_its_float_weights(random_run, tmp_path):
    cfg, folder = random_run
    qnet, _ = build_network({**cfg, "network": {**cfg["network"], "pretrained": str(folder / "best.ckpt")}})
    save_atomic(make_checkpoint(qnet.state_dict(), {}), tmp_path / "qat.ckpt")  # quantizer keys as well
    loaded = float_weights_network(cfg, tmp_path / "qat.ckpt")
    assert torch.equal(loaded.get_submodule("features.17.0").weight,
                       qnet.get_submodule("features.17.0").weight)
    assert not any(getattr(m, "started", False) for m in loaded.modules())


def test_sensitivity_errors(random_run, tmp_path):
    cfg, folder = random_run
    fp32 = load_config(ROOT / "configs" / "embedded" / "config.fp32.json", check_files=False)
    with pytest.raises(ConfigError, match="network.quantize.*config.pact.4b.json"):
        measure_sensitivity(fp32, folder)
    with pytest.raises(CheckpointError, match="not found: train the FP32 run first"):
        measure_sensitivity(cfg, tmp_path / "none")
    with pytest.raises(ValueError, match="SAWB.*bits up to 8"):
        measure_sensitivity(cfg, folder, bits=(2, 10))
    with pytest.raises(ValueError, match="sensitivity method 'hessian': use one of loss, fisher"):
        measure_sensitivity(cfg, folder, method="hessian")
    with pytest.raises(ValueError, match="distinct bit-widths"):
        measure_sensitivity(cfg, folder, bits=(2, 2))
    wide = load_config(PACT4, {"network.pretrained": None, "network.kwargs.capacity": 0.5})
    with pytest.raises(CheckpointError, match="does not fit the network of the config"):
        measure_sensitivity(wide, folder, bits=(2,), n_calib=2)
