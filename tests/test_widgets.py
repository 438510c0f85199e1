"""The bit-width plan and its widget editor, without a browser: build, edit programmatically, check the config."""

import json

import pytest
import torch

from conftest import ROOT
from labkit.bitwidths import BitPlan
from labkit.config import load_config
from labkit.models import MobileNetV2
from labkit.recipe import pact_recipe
from labkit.widgets import BitWidthEditor

PACT = ROOT / "configs" / "embedded" / "config.pact.json"
TQT = ROOT / "configs" / "embedded" / "config.tqt.json"


def embedded_net():
    return MobileNetV2(capacity=0.35, num_classes=10, config="small")


def base(path=PACT):
    return load_config(path, {"network.pretrained": None})


def test_plan_rows_costs_and_formulas():
    net = MobileNetV2()  # 1.0, 224 px
    plan = BitPlan(net, 224)
    assert len(plan.rows) == 53 and plan.rows[0].name == "pilot.0" and plan.rows[-1].name == "classifier.1"
    assert sum(r.kind == "depthwise" for r in plan.rows) == 17
    assert plan["features.2.residual_branch.2.0"].act == "features.2.integer_add"
    assert plan["features.3.residual_branch.2.0"].act == "features.3.output_act"
    stem = plan["pilot.0"]
    assert (stem.params, stem.out_elements, stem.macs) == (864, 32 * 112 * 112, 32 * 112 * 112 * 27)
    t = plan.totals()
    n_params = sum(r.params for r in plan.rows)
    assert t["weight_bytes"] == n_params  # 8 bit = 1 byte per weight
    assert t["weight_compression"] == pytest.approx(4.0)
    assert t["bops"] == sum(r.macs for r in plan.rows) * 64
    plan.set_all(4, 4)
    assert plan.totals()["weight_bytes"] == n_params / 2
    assert plan.costs()[1]["bops"] == plan["features.0.residual_branch.0.0"].macs * 4 * 4
    with pytest.raises(ValueError, match="not a bit-width from 2 to 16"):
        plan.set("pilot.0", w_bits=1)
    with pytest.raises(KeyError, match="no quantized layer named"):
        plan.set("pilot.7", w_bits=4)


def test_plan_config_builds_the_network_it_describes():
    net = embedded_net()
    plan = BitPlan(net, 32)
    plan.set_all(4, 4)
    plan.set_first_last(8, 8)
    plan.set_kind("depthwise", 6, 5)
    plan.set("features.2.residual_branch.2.0", per_channel=False)
    cfg = plan.to_config(base())
    qnet, report = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    levels = {r["name"]: r["n_levels"] for r in report}
    assert levels["pilot.0"] == levels["classifier.1"] == 256 and levels["pilot.2"] == 256
    assert levels["features.3.residual_branch.1.0"] == 64 and levels["features.3.residual_branch.1.2"] == 32
    assert levels["features.3.residual_branch.0.0"] == 16 and levels["features.3.residual_branch.0.2"] == 16
    assert levels["features.2.integer_add"] == 16
    modules = dict(qnet.named_modules())
    assert modules["features.2.residual_branch.2.0"].quantize == "per_layer"
    assert modules["features.3.residual_branch.2.0"].quantize == "per_channel"
    assert modules["features.3.residual_branch.0.0"].init_clip == "sawb_asymm"  # 4-bit weights: SAWB
    assert not modules["pilot.0"].tqt


def test_tqt_base_config_keeps_tqt():
    cfg = BitPlan(embedded_net(), 32).to_config(base(TQT))
    qnet, _ = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    assert all(m.tqt for n, m in qnet.named_modules() if hasattr(m, "tqt") and n)


def test_editor_rows_bulk_totals_and_saved_config(tmp_path):
    editor = BitWidthEditor(embedded_net(), base())
    assert len(editor.rows) == 53
    before = editor.totals.value
    w, a, pc = editor.rows["features.5.residual_branch.0.0"]
    w.value, a.value = 4, 3  # as a user typing in the row
    assert editor.plan["features.5.residual_branch.0.0"].w_bits == 4
    assert editor.plan["features.5.residual_branch.0.0"].a_bits == 3
    assert editor.totals.value != before
    editor.bulk_target.value, editor.bulk_w.value, editor.bulk_a.value = "depthwise", 6, 6
    editor.bulk_apply.click()
    assert editor.rows["features.4.residual_branch.1.0"][0].value == 6  # the row widgets follow the plan
    assert all(r.w_bits == 6 for r in editor.plan.rows if r.kind == "depthwise")
    assert editor.plan["features.5.residual_branch.0.0"].w_bits == 4  # untouched by the depthwise action
    pc_linear = editor.rows["classifier.1"][2]
    assert pc_linear.disabled and editor.rows["classifier.1"][1].disabled
    editor.save_path.value = str(tmp_path / "config.custom.json")
    editor.save_button.click()
    assert "saved" in editor.message.value
    saved = json.loads((tmp_path / "config.custom.json").read_text())
    cfg = load_config(tmp_path / "config.custom.json", {"network.pretrained": None})
    qnet, report = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    levels = {r["name"]: r["n_levels"] for r in report}
    assert levels["features.5.residual_branch.0.0"] == 16 and levels["features.5.residual_branch.0.2"] == 8
    assert levels["features.4.residual_branch.1.0"] == 64
    assert saved["training"] == base()["training"]
    assert qnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_editor_reports_invalid_saves(tmp_path):
    editor = BitWidthEditor(embedded_net(), base())
    (tmp_path / "file").write_text("")
    editor.save_path.value = str(tmp_path / "file" / "config.json")  # a file where a folder must be
    editor.save_button.click()
    assert "not saved" in editor.message.value
