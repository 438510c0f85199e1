"""The per-layer recipe: regex config -> replaced modules + report; errors; shipped configs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from labkit.config.schema import ConfigError
from labkit.models import MobileNetV2
from labkit.quant import PACTAsymmetricAct, PACTConv2d, PACTIntegerAdd, PACTUnsignedAct
from labkit.quant.recipe import REPORT_FIELDS, normalize_quantize_config, pact_recipe

from helpers import default_quantize_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").glob("*/config.*.json") if "fp32" not in p.name)


def small():
    return MobileNetV2(capacity=0.35, num_classes=10, config="small").eval()


def names_of(net, cls):
    return [n for n, m in net.named_modules() if type(m) is cls]


CONV_DEFAULTS = {"n_levels": 256, "quantize": "per_channel", "init_clip": "max", "symm_wts": True}


# ------------------------------------------------------------------ behaviour
def test_both_layouts_give_the_same_network_and_report():
    seed = {"PACTConv2d": {"kwargs": CONV_DEFAULTS, "pilot.0$": {"n_levels": 16}, "features.1\\.": {}},
            "PACTUnsignedAct": {"kwargs": {"n_levels": 16}, "pilot.2$": {}}, "harmonize": False}
    reference = {"function": "pact_recipe", "kwargs": {"config": copy.deepcopy(seed)}}
    net_a, rep_a = pact_recipe(small(), seed)
    net_b, rep_b = pact_recipe(small(), reference)
    assert rep_a == rep_b
    assert names_of(net_a, PACTConv2d) == names_of(net_b, PACTConv2d) == \
        ["pilot.0", "features.1.residual_branch.0.0", "features.1.residual_branch.1.0",
         "features.1.residual_branch.2.0"]
    assert normalize_quantize_config(reference) == seed


def test_regexes_match_from_the_start_and_defaults_fill_missing_keys():
    cfg = {"PACTConv2d": {"kwargs": CONV_DEFAULTS,
                          r"features\.1\d\.residual_branch\.0\.0$": {"n_levels": 16,
                                                                     "init_clip": "sawb_asymm"}},
           "harmonize": False}
    net, report = pact_recipe(small(), cfg)
    assert names_of(net, PACTConv2d) == [f"features.{b}.residual_branch.0.0" for b in range(10, 17)]
    mods = dict(net.named_modules())
    conv = mods["features.12.residual_branch.0.0"]
    assert (conv.n_levels, conv.init_clip, conv.quantize, conv.symm) == (16, "sawb_asymm", "per_channel",
                                                                         True)
    assert report[0] == {"name": "features.10.residual_branch.0.0", "type": "PACTConv2d", "source": "recipe",
                         "n_levels": 16, "bits": 4, "per_channel": True, "init_clip": "sawb_asymm",
                         "learn_clip": False, "tqt": False}
    assert all(set(r) == set(REPORT_FIELDS) for r in report)
    # untouched layers stay float
    assert type(mods["pilot.0"]) is nn.Conv2d and type(mods["classifier.1"]) is nn.Linear


def test_weights_are_copied_and_act_kind_follows_the_replaced_module():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    ref = copy.deepcopy(net)
    cfg = {"PACTConv2d": {"kwargs": {"n_levels": 256}, ".*": {}},
           "PACTLinear": {"5$": {"quantize": "per_layer"}},
           "PACTUnsignedAct": {"1$": {}, "3$": {"n_levels": 16}}, "harmonize": False}
    qnet, report = pact_recipe(net, cfg)
    assert qnet is net  # replaced in place, names kept
    assert [type(m).__name__ for m in qnet] == ["PACTConv2d", "PACTUnsignedAct", "PACTConv2d",
                                                "PACTUnsignedAct",
                                                "Flatten", "PACTLinear"]
    assert (qnet[1].act_kind, qnet[3].act_kind, qnet[3].n_levels) == ("relu", "relu6", 16)
    for i in (0, 2, 5):
        assert torch.equal(qnet[i].weight, ref[i].weight) and torch.equal(qnet[i].bias, ref[i].bias)
    x = torch.randn(2, 3, 6, 6) * 20  # large inputs: a relu6 in place of the relu would clip them
    torch.testing.assert_close(qnet(x), ref(x), rtol=0, atol=0)
    assert [r["name"] for r in report] == ["0", "1", "2", "3", "5"]


def test_harmonize_absent_means_default_harmonization_and_false_skips_it():
    cfg = default_quantize_config(small())
    del cfg["harmonize"]
    net, report = pact_recipe(small(), cfg)
    assert isinstance(net, fx.GraphModule)
    assert any(isinstance(m, PACTIntegerAdd) for m in net.modules())
    assert any(r["name"] == "avgpool_act" for r in report)  # requant_pool defaults to True

    cfg["harmonize"] = False
    plain = small()
    net, report = pact_recipe(plain, cfg)
    assert net is plain and not isinstance(net, fx.GraphModule)
    assert not any(isinstance(m, (PACTIntegerAdd, PACTAsymmetricAct)) for m in net.modules())
    assert {r["source"] for r in report} == {"recipe"}


def test_default_quantize_config_lists_every_layer_with_reference_keys():
    net = MobileNetV2()
    cfg = default_quantize_config(net)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    relus = [n for n, m in net.named_modules() if isinstance(m, nn.ReLU6)]
    assert [k for k in cfg["PACTConv2d"] if k != "kwargs"] == [n + "$" for n in convs]
    assert [k for k in cfg["PACTUnsignedAct"] if k != "kwargs"] == [n + "$" for n in relus]
    assert list(cfg["PACTLinear"]) == ["kwargs", "classifier.1$"]
    assert "pilot.0$" in cfg["PACTConv2d"] and "features.17.0$" in cfg["PACTConv2d"]
    assert "features.3.residual_branch.1.2$" in cfg["PACTUnsignedAct"]
    assert (
        cfg["PACTConv2d"]["kwargs"]["quantize"] == "per_channel"
        and cfg["PACTLinear"]["kwargs"]["quantize"] == "per_layer"
    )
    assert cfg["PACTUnsignedAct"]["kwargs"]["learn_clip"] is True  # PACT learns alpha
    json.dumps(cfg)


def test_default_quantize_config_bits_overrides_and_tqt():
    cfg = default_quantize_config(small(), w_bits=4, a_bits=4, tqt=True, pow2=True,
                                  overrides={"pilot.0": 8, "classifier.1": {"n_levels": 256},
                                             "avgpool_act": 8})
    net, report = pact_recipe(small(), cfg)
    levels = {r["name"]: r["n_levels"] for r in report}
    assert levels["pilot.0"] == 256 and levels["classifier.1"] == 256 and levels["avgpool_act"] == 256
    assert levels["features.5.residual_branch.1.0"] == 16 and levels["pilot.2"] == 16
    assert levels["features.5.integer_add"] == 16
    assert all(r["tqt"] for r in report)
    mods = dict(net.named_modules())
    assert mods["features.5.residual_branch.1.0"].pow2 and mods["features.5.integer_add"].acts[0].pow2
    with pytest.raises(ValueError, match="pilot.1.*BatchNorm2d"):
        default_quantize_config(small(), overrides={"pilot.1": 8})
    with pytest.raises(ValueError, match="'pilot.9'"):
        default_quantize_config(small(), overrides={"pilot.9": 8})
    with pytest.raises(ValueError, match="w_bits"):
        default_quantize_config(small(), w_bits=0)


# ------------------------------------------------------------------ errors
def check_error(cfg, exc, *patterns):
    net = small()
    before = [type(m) for m in net.modules()]
    with pytest.raises(exc) as info:
        pact_recipe(net, cfg)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert [type(m) for m in net.modules()] == before  # nothing replaced on error
    return str(info.value)


def test_regex_matching_no_module():
    msg = check_error({"PACTConv2d": {"pilot.0$": {}, "feature.3.residual_branch.1.0$": {}}}, ValueError,
                      "PACTConv2d", r"'feature\.3\.residual_branch\.1\.0\$'", "matches no module",
                      "did you mean 'features.3.residual_branch.1.0'")
    assert "Fix the name" in msg
    # matched from the start of the name, not searched inside it
    check_error({"PACTConv2d": {"residual_branch.0.0$": {}}}, ValueError, "matches no module")


def test_module_matched_by_two_regexes_within_one_class():
    check_error({"PACTConv2d": {"pilot.0$": {}, "features.1.residual_branch.0.0$": {}, "features.1\\.": {}}},
                ValueError, "PACTConv2d", "'features.1.residual_branch.0.0'", "both", "disjoint")


def test_regex_hitting_a_module_of_the_wrong_type():
    check_error({"PACTConv2d": {"pilot.2$": {}}}, ConfigError, "PACTConv2d", r"'pilot\.2' \(ReLU6\)",
                "Move the entry under 'PACTUnsignedAct'")
    check_error({"PACTUnsignedAct": {"pilot.1$": {}}}, ConfigError, "PACTUnsignedAct", "BatchNorm2d",
                "nn.ReLU6")


def test_unknown_kwarg_names_layer_and_kwarg():
    check_error({"PACTConv2d": {"kwargs": {"n_levels": 256}, "pilot.0$": {"n_level": 16}}}, ConfigError,
                r"PACTConv2d\['pilot\.0\$'\]\.n_level'", "unknown quantizer setting",
                "did you mean 'n_levels'")
    check_error({"PACTUnsignedAct": {"pilot.2$": {"symm": True}}}, ConfigError, "PACTUnsignedAct", "symm",
                "Settings of unsigned_act")
    check_error({"PACTConv2d": {"pilot.0$": {"quantize": "per_tensor"}}}, ValueError, "pilot.0", "per_tensor")


def test_n_levels_outside_2_to_16_bits():
    check_error({"PACTLinear": {"classifier.1$": {"n_levels": 1}}}, ValueError, "PACTLinear", "classifier.1",
                "2 to 16 bits")
    check_error({"PACTLinear": {"classifier.1$": {"n_levels": 2 ** 33}}}, ValueError, "classifier.1",
                "2 to 16 bits")
    check_error({"PACTConv2d": {"kwargs": {"n_levels": 8.0}, "pilot.0$": {}}}, ValueError,
                "n_levels must be an integer")


def test_unknown_class_key_and_layout_errors():
    check_error({"PACTConv2D": {"pilot.0$": {}}}, ConfigError, "network.quantize.PACTConv2D'", "unknown key",
                "did you mean 'PACTConv2d'")
    check_error({"function": "bb_recipe", "kwargs": {"config": {}}}, ConfigError, "pact_recipe")
    check_error({"function": "pact_recipe", "kwargs": {"cfg": {}}}, ConfigError, "kwargs.cfg'", "unknown key")
    check_error({"PACTConv2d": {"pilot.0$": 8}}, ConfigError, "pilot.0", "quantizer settings")
    check_error({"PACTConv2d": {"pilot.(0$": {}}}, ConfigError, "not a valid regular expression")
    check_error({"harmonize": "yes"}, ConfigError, "harmonize")


def test_bad_harmonize_kwargs_are_reported_under_network_quantize():
    cfg = {"PACTConv2d": {"pilot.0$": {}}, "harmonize": {"n_levels": 256, "symetric": True}}
    with pytest.raises(ConfigError, match=r"network\.quantize\.harmonize\.symetric"):
        pact_recipe(small(), cfg)


def test_already_quantized_network_is_refused():
    net, _ = pact_recipe(small(), {"PACTConv2d": {"pilot.0$": {}}, "harmonize": False})
    with pytest.raises(ValueError, match="already quantized"):
        pact_recipe(net, {"PACTConv2d": {"pilot.0$": {}}})


# ------------------------------------------------------------------ the reference recipe's keyword arguments
def reference_layout(config, **kwargs):
    return {"function": "pact_recipe", "kwargs": {"config": config, **kwargs}}


def unsigned_acts(net):
    return [n for n, m in net.named_modules() if type(m) is PACTUnsignedAct]


def test_quantize_pool_false_gives_the_reference_network_of_35_unsigned_activations():
    cfg = default_quantize_config(small())
    del cfg["harmonize"]["requant_pool"]
    ref_net, _ = pact_recipe(small(), reference_layout(copy.deepcopy(cfg), quantize_pool=False))
    pool_net, _ = pact_recipe(small(), reference_layout(copy.deepcopy(cfg), quantize_pool=True))
    default_net, _ = pact_recipe(small(), reference_layout(copy.deepcopy(cfg)))
    assert len(unsigned_acts(ref_net)) == 35 and "avgpool_act" not in dict(ref_net.named_modules())
    assert unsigned_acts(pool_net) == unsigned_acts(default_net) == unsigned_acts(ref_net) + ["avgpool_act"]
    # without the requantizer the classifier reads the pool's float mean, as in the reference
    pool_node = next(n for n in ref_net.graph.nodes if n.target == "avgpool")
    assert [u.target for u in pool_node.users] == ["flatten"]
    assert normalize_quantize_config(reference_layout(copy.deepcopy(cfg), quantize_pool=False))["harmonize"][
        "requant_pool"] is False
    with pytest.raises(ConfigError, match=r"kwargs\.quantize_pool'.*requant_pool is true"):
        pact_recipe(small(), reference_layout({**cfg, "harmonize": {"requant_pool": True}},
                                              quantize_pool=False))
    with pytest.raises(ConfigError, match=r"kwargs\.quantize_pool'.*harmonize is false"):
        pact_recipe(small(), reference_layout({**cfg, "harmonize": False}, quantize_pool=True))
    with pytest.raises(ConfigError, match=r"kwargs\.quantize_pool'.*true or false"):
        pact_recipe(small(), reference_layout(cfg, quantize_pool="no"))


def test_precision_spec_file_overrides_n_levels_of_recipe_and_inserted_layers(tmp_path):
    cfg = default_quantize_config(small())
    cfg["harmonize"]["layers"] = {r"features\.\d+\.integer_add$": {"init_clip": "const"}}
    spec = tmp_path / "bb.json"
    spec.write_text(json.dumps({"layer_levels": {
        "module.pilot.0": 16, "module.features.3.residual_branch.1.2$": 4,
        "module.features.2.integer_add": 16,
        "module.avgpool_act": 8, "module.classifier.1": 64}}))
    net, report = pact_recipe(small(), reference_layout(cfg, precision_spec_file=str(spec)))
    levels = {r["name"]: r["n_levels"] for r in report}
    assert (levels["pilot.0"], levels["features.3.residual_branch.1.2"], levels["classifier.1"]) == (16, 4,
                                                                                                     64)
    assert (levels["features.2.integer_add"], levels["avgpool_act"]) == (16, 8)
    mods = dict(net.named_modules())
    add = mods["features.2.integer_add"]
    assert [q.n_levels for q in add.quantizers()] == [16, 16, 16]
    # the layers entry kept
    assert add.acts[0].init_clip == "const" == mods["features.4.integer_add"].acts[0].init_clip
    assert mods["features.4.integer_add"].n_levels == 256 and levels["features.3.residual_branch.0.0"] == 256
    assert sum(v != 256 for v in levels.values()) == 5

    for layer_levels, match in (({"features.3.residual_branch.1.1": 16},
                                 "'features.3.residual_branch.1.1' is a "
                                 "BatchNorm2d that network.quantize does not quantize"),
                                ({"features.2.integer_ad": 16}, "names no module.*did you mean "
                                                                "'features.2.integer_add'"),
                                ({"_QL_OP_TREE_REPLACE_ADD_0": 16}, "names no module.*avgpool_act"),
                                ({"pilot.0": 3.5}, "layer 'pilot.0': n_levels must be an integer")):
        spec.write_text(json.dumps({"layer_levels": layer_levels}))
        with pytest.raises(ConfigError, match=r"kwargs\.precision_spec_file'.*" + match):
            pact_recipe(small(), reference_layout(cfg, precision_spec_file=str(spec)))
    spec.write_text(json.dumps({"levels": {}}))
    with pytest.raises(ConfigError, match="no \"layer_levels\" object"):
        pact_recipe(small(), reference_layout(cfg, precision_spec_file=str(spec)))
    with pytest.raises(ConfigError, match=r"precision_spec_file'.*'.*nowhere\.json' not found"):
        pact_recipe(small(), reference_layout(cfg, precision_spec_file=str(tmp_path / "nowhere.json")))


def test_finetuning_ckpt_is_loaded_after_the_recipe(tmp_path, monkeypatch):
    from labkit.config.loading import resolve_config
    from labkit.train.build import build_network
    from labkit.train.checkpoint import CheckpointError

    raw = json.loads((ROOT / "configs" / "embedded" / "config.pact.json").read_text())
    raw["network"]["pretrained"] = None
    section = raw["network"]["quantize"]
    donor, _ = build_network(resolve_config(raw))
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(torch.randn_like(p))
    state = {"module." + k: v for k, v in donor.state_dict().items()}
    del state["module.classifier.1.bias"]
    state["module._QL_SOMETHING.clip_lo"] = torch.zeros(())
    monkeypatch.chdir(tmp_path)
    torch.save({"net": state, "epoch": 3}, tmp_path / "ft.ckpt")
    raw["network"]["quantize"] = reference_layout(section, finetuning_ckpt="ft.ckpt")
    cfg = resolve_config(raw)  # a relative path: read from the current directory (else the project root)
    with pytest.warns(UserWarning, match=r"finetuning_ckpt.*1 are not in it.*'classifier.1.bias'.*1 of its"):
        net, _ = build_network(cfg)
    got, want = net.state_dict(), donor.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if k != "classifier.1.bias")
    assert not torch.equal(got["classifier.1.bias"], want["classifier.1.bias"])
    unloaded, _ = build_network(cfg, pretrained=False)  # a run's own checkpoint comes next: not loaded
    assert not torch.equal(unloaded.state_dict()["pilot.0.weight"], want["pilot.0.weight"])

    torch.save({"model": state}, tmp_path / "ft.ckpt")
    with pytest.raises(CheckpointError, match="holds no state dict under 'net' \\(it holds: model\\)"):
        build_network(cfg)
    torch.save({"net": {"pilot.0.weight": torch.zeros(3)}}, tmp_path / "ft.ckpt")
    with pytest.raises(CheckpointError, match="'pilot.0.weight' has shape \\(3,\\)"):
        build_network(cfg)
    (tmp_path / "ft.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"kwargs\.finetuning_ckpt'.*not found"):
        build_network(cfg)


# ------------------------------------------------------------------ shipped configs
def expected_levels(path: Path, name: str, kind: str) -> int:
    if "4b" in path.name:
        return 16
    if "mixed" in path.name:
        return 256 if name in ("pilot.0", "classifier.1", "avgpool_act") else 16
    return 256


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config(path):
    from labkit.config.loading import resolve_config

    raw = json.loads(path.read_text())
    cfg = resolve_config(raw, {"network.pretrained": None})  # the checkpoint need not exist for this test
    net = MobileNetV2(**cfg["network"]["kwargs"])
    float_names = {n: type(m) for n, m in net.named_modules()}
    qnet, report = pact_recipe(net, cfg["network"]["quantize"])

    # every layer listed explicitly, with the reference's key style
    section = normalize_quantize_config(cfg["network"]["quantize"])
    assert {k for k in section["PACTConv2d"] if k != "kwargs"} == {n + "$" for n,
                                                                   t in float_names.items() if t is nn.Conv2d}
    assert {k for k in section["PACTUnsignedAct"] if k != "kwargs"} == {
        n + "$" for n, t in float_names.items() if t is nn.ReLU6
    }
    assert {k for k in section["PACTLinear"] if k != "kwargs"} == {"classifier.1$"}

    counts = {}
    for row in report:
        counts[row["type"]] = counts.get(row["type"], 0) + 1
    skips = sum(b.use_skip for b in MobileNetV2(**cfg["network"]["kwargs"]).features[:17])
    assert counts == {"PACTConv2d": 52, "PACTLinear": 1, "PACTUnsignedAct": 35 + 1, "PACTIntegerAdd": skips,
                      "PACTAsymmetricAct": 17 - skips}
    if cfg["network"]["kwargs"]["config"] == "standard":
        assert skips == 10

    tqt = "tqt" in path.name
    for row in report:
        assert row["n_levels"] == expected_levels(path, row["name"], row["type"]), row
        assert row["tqt"] is tqt, row
        assert row["per_channel"] is (row["type"] == "PACTConv2d"), row
        if row["type"] in ("PACTUnsignedAct", "PACTAsymmetricAct", "PACTIntegerAdd") or tqt:
            assert row["learn_clip"] is True, row  # PACT really learns alpha

    training = cfg["training"]
    sched = training["gd"]["lr_sched"]
    assert sched["class"] == "HandScheduler" and sched["kwargs"]["schedule"]["0"] == 1
    if tqt:
        assert training["gd"]["opt"]["class"] == "SGD"
        assert all(
            v != "freeze" and "freeze" not in v
            for s in training["quantize"]["kwargs"]["schedules"].values()
            for v in s.values()
        )
    else:
        assert training["gd"]["opt"]["class"] == "PACTSGD" and training["gd"]["opt"]["takes_net"] is True
        assert training["gd"]["opt"]["kwargs"]["pact_decay"] == 1e-3
    assert training["quantize"]["function"] == "get_pact_controllers"
    if path.parent.name == "embedded":
        assert raw["network"]["pretrained"] == "runs/embedded-fp32/best.ckpt"
    else:
        assert raw["network"]["quantize"]["function"] == "pact_recipe"  # the reference's own layout

    # the controllers accept the training.quantize kwargs on this network
    try:
        from labkit.quant import get_pact_controllers
    except ImportError:  # pragma: no cover - controllers land separately
        return
    controllers = get_pact_controllers(qnet, **training["quantize"]["kwargs"])
    assert controllers
