"""The torch.fx harmonization pass: integer adders, inserted signed activations, pool requantizer."""

from __future__ import annotations

import copy
import json
import operator
import warnings
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from labkit.models import MobileNetV2
from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTLinear, PACTUnsignedAct
from labkit.quant.harmonize import META_KEY, harmonize, harmonized_layers
from labkit.quant.recipe import normalize_quantize_config, pact_recipe

from helpers import default_quantize_config

ROOT = Path(__file__).resolve().parents[1]
SKIP_BLOCKS = [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]
NON_SKIP_BLOCKS = [0, 1, 3, 6, 10, 13, 16]
QUANTIZER_TYPES = (PACTUnsignedAct, PACTAsymmetricAct, PACTIntegerAdd)


def imagenet_pact_config() -> dict:
    cfg = json.loads((ROOT / "configs" / "imagenet" / "config.pact.json").read_text())
    return cfg["network"]["quantize"]


def quantized(capacity=1.0, config="standard", num_classes=1000, quantize=None, seed=0):
    """(float reference copy, harmonized net, report) for a MobileNetV2 in eval mode."""
    torch.manual_seed(seed)
    net = MobileNetV2(capacity=capacity, num_classes=num_classes, config=config).eval()
    _randomize_bn(net)
    ref = copy.deepcopy(net)
    qnet, report = pact_recipe(net, quantize if quantize is not None else imagenet_pact_config())
    return ref, qnet, report


def _randomize_bn(net):
    """Non-trivial BN statistics so that float equivalence is not a trivial identity-BN check."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def by_type(net, cls):
    return {n for n, m in net.named_modules() if type(m) is cls}


def call_modules(gm):
    mods = dict(gm.named_modules())
    return {n.target: n for n in gm.graph.nodes if n.op == "call_module"}, mods


@pytest.fixture(scope="module")
def mnv2():
    return quantized()


def test_mobilenetv2_pact_imagenet_layer_counts(mnv2):
    _, qnet, report = mnv2
    assert isinstance(qnet, fx.GraphModule)
    # recipe: every conv and the linear quantized, every ReLU6 replaced; no float leftovers
    assert len(by_type(qnet, PACTConv2d)) == 52
    assert len(by_type(qnet, PACTLinear)) == 1
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU6) for m in qnet.modules())
    adders = by_type(qnet, PACTIntegerAdd)
    assert adders == {f"features.{b}.integer_add" for b in SKIP_BLOCKS}
    assert by_type(qnet, PACTAsymmetricAct) - {n for a in adders for n in (f"{a}.acts.0", f"{a}.acts.1",
                                                                           f"{a}.act_out")} \
        == {f"features.{b}.output_act" for b in NON_SKIP_BLOCKS}
    assert by_type(qnet, PACTUnsignedAct) - {"avgpool_act"} == \
        {n for n, m in MobileNetV2().named_modules() if isinstance(m, nn.ReLU6)}
    assert len(by_type(qnet, PACTUnsignedAct)) == 35 + 1
    # the report lists the same, as plain data
    counts = {}
    for row in report:
        counts[(row["type"], row["source"])] = counts.get((row["type"], row["source"]), 0) + 1
    assert counts == {("PACTConv2d", "recipe"): 52, ("PACTLinear", "recipe"): 1,
                      ("PACTUnsignedAct", "recipe"): 35,
                      ("PACTIntegerAdd", "harmonize"): 10, ("PACTAsymmetricAct", "harmonize"): 7,
                      ("PACTUnsignedAct", "harmonize"): 1}
    json.dumps(report)  # plain data
    assert [r["name"] for r in harmonized_layers(qnet)] == [
        r["name"] for r in report if r["source"] == "harmonize"
    ]


def test_every_quantized_layer_reads_a_quantized_tensor(mnv2):
    """The invariant the pass establishes: each PACT conv/linear input comes from a quantizer (or the
    image)."""
    _, qnet, _ = mnv2
    mods = dict(qnet.named_modules())
    checked = 0
    for node in qnet.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], (PACTConv2d, PACTLinear)):
            src = node.args[0]
            while src.op == "call_module" and isinstance(mods[src.target], (nn.Flatten, nn.Dropout)):
                src = src.args[0]
            assert src.op == "placeholder" or isinstance(mods.get(src.target), QUANTIZER_TYPES), \
                f"{node.target} reads {src.target}"
            checked += 1
    assert checked == 53
    assert not any(n.op == "call_function" and n.target in (operator.add,
                                                            torch.add) for n in qnet.graph.nodes)


def test_inserted_modules_sit_where_the_facts_say(mnv2):
    _, qnet, _ = mnv2
    nodes, mods = call_modules(qnet)
    for b in NON_SKIP_BLOCKS:
        act = nodes[f"features.{b}.output_act"]
        last = 1 if b == 0 else 2
        assert act.args[0].target == f"features.{b}.residual_branch.{last}.1"  # after the projection BN
        assert isinstance(mods[act.args[0].target], nn.BatchNorm2d)
        assert mods[f"features.{b}.output_act"].signed
    for b in SKIP_BLOCKS:
        add = nodes[f"features.{b}.integer_add"]
        skip, branch = add.args
        assert branch.target == f"features.{b}.residual_branch.2.1"
        # the skip carries the previous block's quantized output (an adder's or an inserted act's)
        prev = f"features.{b - 1}.integer_add" if (b - 1) in SKIP_BLOCKS else f"features.{b - 1}.output_act"
        assert skip.target == prev
        # and the block's first conv reads the same tensor
        assert nodes[f"features.{b}.residual_branch.0.0"].args[0] is skip
    pool_act = nodes["avgpool_act"]
    assert pool_act.args[0].target == "avgpool" and mods["avgpool_act"].act_kind == "relu"
    assert nodes["flatten"].args[0] is pool_act


def test_float_mode_numerics_equal_the_original(mnv2):
    ref, qnet, _ = mnv2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        got = qnet(x)
    assert not any(m.started for m in qnet.modules() if hasattr(m, "started") and not isinstance(m,
                                                                                                 PACTIntegerAdd))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 1e-3  # a meaningful comparison


def test_quantized_net_differs_after_start(mnv2):
    """The inserted quantizers are live: starting them (8 bit) changes the output a little, not a lot."""
    ref, qnet, _ = mnv2
    qnet = copy.deepcopy(qnet)
    x = torch.randn(2, 3, 64, 64)
    qnet.train()
    with torch.no_grad():
        qnet(x)  # gather activation statistics
    qnet.eval()
    for m in qnet.modules():
        if hasattr(m, "start") and not isinstance(m, PACTIntegerAdd):
            m.start()
    for m in qnet.modules():
        if isinstance(m, PACTIntegerAdd):
            m.sync_eps()
    with torch.no_grad():
        expected, got = ref(x), qnet(x)
    diff = (got - expected).abs().max()
    assert 0 < diff < 0.5 * expected.abs().max()


def test_requant_pool_off_reproduces_the_reference():
    quantize = normalize_quantize_config(imagenet_pact_config())
    quantize["harmonize"]["requant_pool"] = False
    _, qnet, report = quantized(0.35, "small", 10, quantize)
    names = {r["name"] for r in report if r["source"] == "harmonize"}
    assert "avgpool_act" not in names and len(names) == 11 + 6
    nodes, _ = call_modules(qnet)
    assert nodes["flatten"].args[0].target == "avgpool"


def test_small_config_width_035():
    """At width 0.35 the small table gives block 1 stride 1 and 8 -> 8 channels: a skip (11 adders, 6
    acts)."""
    skips = [i for i, b in enumerate(MobileNetV2(0.35, 10, "small").features[:17]) if b.use_skip]
    assert skips == [1] + SKIP_BLOCKS
    ref, qnet, report = quantized(0.35, "small", 10)
    assert len(by_type(qnet, PACTConv2d)) == 52
    assert by_type(qnet, PACTIntegerAdd) == {f"features.{b}.integer_add" for b in skips}
    assert {r["name"] for r in report if r["type"] == "PACTAsymmetricAct"} == \
        {f"features.{b}.output_act" for b in range(17) if b not in skips}
    assert sum(r["source"] == "harmonize" for r in report) == 11 + 6 + 1
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(qnet(x), ref(x), rtol=0, atol=1e-5)
    assert (qnet.num_classes, qnet.capacity, qnet.config) == (10, 0.35, "small")


def test_deepcopy_and_state_dict_round_trip():
    _, qnet, _ = quantized(0.35, "small", 10)
    x = torch.randn(4, 3, 32, 32)
    # perturb every parameter and buffer so that a load that silently skipped a key would show
    with torch.no_grad():
        for t in list(qnet.parameters()) + [b for b in qnet.buffers() if b.is_floating_point()]:
            t.add_(torch.rand_like(t) * 0.05)
    qnet.train()
    qnet(x)  # activation statistics differ from a fresh net's
    qnet.eval()

    twin = copy.deepcopy(qnet)
    assert harmonized_layers(twin) == harmonized_layers(qnet) and twin.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(twin(x), qnet(x), rtol=0, atol=0)
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(twin.parameters()), next(qnet.parameters()))  # independent copies

    state = qnet.state_dict()
    assert "pilot.0.weight" in state and "features.3.residual_branch.1.0.weight" in state
    assert "features.2.integer_add.acts.0.clip_hi" in state and "avgpool_act.clip_hi" in state
    _, fresh, _ = quantized(0.35, "small", 10, seed=5)
    assert fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qnet(x), rtol=0, atol=0)


def test_backward_reaches_every_parameter_in_training_mode():
    _, qnet, _ = quantized(0.35, "small", 10)
    qnet.train()
    loss = qnet(torch.randn(4, 3, 32, 32)).square().mean()
    loss.backward()
    weights = [(n, p) for n, p in qnet.named_parameters() if n.endswith("weight")]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in weights)


def test_harmonizing_twice_inserts_nothing():
    _, qnet, _ = quantized(0.35, "small", 10)
    again = harmonize(qnet, n_levels=256)
    assert sorted(n for n, _ in again.named_modules()) == sorted(n for n, _ in qnet.named_modules())
    assert harmonized_layers(again) == harmonized_layers(qnet)


# ------------------------------------------------------------------ generic graphs
class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.flatten(self.fc1(x), 1))


class Adds(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = torch.add(self.a(x), self.relu(x))
        z = y.add(self.b(y))
        return z + 1.0  # a constant add stays an add


def test_linear_into_linear_gets_a_signed_act_named_after_the_producer():
    net = TwoLinears()
    net.fc2 = PACTLinear.from_float(net.fc2)
    gm = harmonize(net, n_levels=16)
    nodes, mods = call_modules(gm)
    assert isinstance(mods["fc1_act"], PACTAsymmetricAct) and mods["fc1_act"].n_levels == 16
    assert nodes["fc1_act"].args[0] is nodes["fc1"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def test_float_consumer_needs_no_quantizer():
    net = TwoLinears()
    gm = harmonize(net)
    assert harmonized_layers(gm) == []


def test_function_and_method_adds_become_integer_adders():
    net = Adds()
    gm = harmonize(net, layers={"integer_add_1$": {"n_levels": 16}})
    mods = dict(gm.named_modules())
    assert isinstance(mods["integer_add"], PACTIntegerAdd) and mods["integer_add"].n_levels == 256
    assert isinstance(mods["integer_add_1"], PACTIntegerAdd) and mods["integer_add_1"].n_levels == 16
    assert sum(n.op == "call_function" and n.target is operator.add for n in gm.graph.nodes) == 1  # the + 1.0
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def test_add_with_alpha_is_refused():
    class Alpha(nn.Module):
        def forward(self, x):
            return torch.add(x, x * 2, alpha=3)

    with pytest.raises(ValueError, match="alpha"):
        harmonize(Alpha())


def test_unquantized_activation_before_a_quantized_layer_warns():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1))
    net[2] = PACTConv2d.from_float(net[2])
    with pytest.warns(UserWarning, match=r"2.*PACTUnsignedAct"):
        harmonize(net)
    net[1] = PACTUnsignedAct()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert harmonized_layers(harmonize(net)) == []


def test_option_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"'nope\$' matches no inserted module.*integer_add"):
        harmonize(Adds(), layers={"nope$": {}})
    with pytest.raises(TypeError, match="requant_pool"):
        harmonize(Adds(), requant_pool="yes")
    with pytest.raises(TypeError, match="integer_add.*bogus"):
        harmonize(Adds(), bogus=1)
    with pytest.raises(ValueError, match="n_levels"):
        harmonize(Adds(), n_levels=1)


def test_default_config_harmonize_overrides_reach_inserted_modules():
    net = MobileNetV2(0.35, 10, "small")
    cfg = default_quantize_config(net, 4, 4, overrides={"avgpool_act": 8,
                                                        "features.2.integer_add": {"n_levels": 64}})
    qnet, report = pact_recipe(net, cfg)
    levels = {r["name"]: r["n_levels"] for r in report}
    assert levels["avgpool_act"] == 256 and levels["features.2.integer_add"] == 64
    assert levels["features.4.integer_add"] == 16 and levels["features.0.output_act"] == 16
    assert dict(qnet.named_modules())["features.2.integer_add"].act_out.n_levels == 64
    assert META_KEY in qnet.meta


def test_training_flag_of_the_graph_module_follows_the_net():
    net = MobileNetV2(0.35, 10, "small").eval()
    qnet, _ = pact_recipe(net, default_quantize_config(net))
    assert not qnet.training and not any(m.training for m in qnet.modules())
    qnet.train()
    assert all(m.training for m in qnet.modules())
