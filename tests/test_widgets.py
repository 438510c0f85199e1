"""The bit-width plan and its widget editor, without a browser: build, edit programmatically, check the
config."""

import copy
import json
import math

import pytest
import torch

from labkit.config.loading import load_config
from labkit.config.schema import ConfigError
from labkit.integer import input_eps, integerize
from labkit.integer.size import size_report
from labkit.lab.widgets import BitWidthEditor
from labkit.models import MobileNetV2
from labkit.precision.bitplan import INPUT, BitPlan
from labkit.precision.costs import act_bytes, bops, weight_bytes
from labkit.quant import quantizers
from labkit.quant.recipe import pact_recipe

from helpers import ROOT

PACT = ROOT / "configs" / "embedded" / "config.pact.json"
TQT = ROOT / "configs" / "embedded" / "config.tqt.json"


def embedded_net():
    return MobileNetV2(capacity=0.35, num_classes=10, config="small")


def base(path=PACT):
    return load_config(path, {"network.pretrained": None})


def levels_of(cfg):
    _, report = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    return {r["name"]: r["n_levels"] for r in report}


def test_plan_rows_costs_and_formulas():
    plan = BitPlan.from_config(load_config(ROOT / "configs" / "imagenet" / "config.pact.json",
                                           check_files=False))
    rows = plan.rows
    assert len(rows) == 53 and rows[0].name == "pilot.0" and rows[-1].name == "classifier.1"
    assert sum(r.kind == "depthwise" for r in rows) == 17
    assert plan["features.2.residual_branch.2.0"].act == "features.2.integer_add"
    assert plan["features.3.residual_branch.2.0"].act == "features.3.output_act"
    assert plan["classifier.1"].act is None and plan.links["classifier.1"]["input"] == "avgpool_act"
    stem = next(g for g in plan.layers if g.name == "pilot.0")
    assert (stem.params, stem.macs, stem.input) == (864, 32 * 112 * 112 * 27, INPUT)
    t = plan.totals()
    weights = sum(g.params for g in plan.layers)
    assert t["weight_bytes"] == weights + 4 * 1000  # 8 bit = 1 byte per weight, int32 classifier bias
    assert t["BOPs"] == sum(g.macs for g in plan.layers) * 64
    assert t["act_bytes"] == sum(math.prod(q.shape) for q in plan.quantizers)
    plan.set_all(4, 4)
    t4 = plan.totals()
    assert t4["weight_bytes"] == weights // 2 + 4 * 1000
    costs = {c["name"]: c for c in plan.costs()}
    dw = next(g for g in plan.layers if g.name == "features.0.residual_branch.0.0")
    assert costs[dw.name]["BOPs"] == bops(dw.macs, 4, 4) and costs["pilot.0"]["BOPs"] == bops(stem.macs, 4, 8)
    assert plan.a_bits["avgpool_act"] == 4  # the pool requantizer follows the last activation
    with pytest.raises(ValueError, match="not a bit-width from 2 to 16"):
        plan.set("pilot.0", w_bits=1)
    with pytest.raises(KeyError, match="no quantized layer named"):
        plan.set("pilot.7", w_bits=4)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (8, 4)])
def test_editor_prediction_equals_the_size_report_of_the_integer_network(bits, one_thread):
    """One cost model: the plan (from the float network's shapes) and the size report (from the integer
    network built with those bits) give the same numbers, row by row and in total."""
    plan = BitPlan.from_config(base())
    plan.set_all(*bits)
    cfg = plan.apply_to(base())
    qnet, _ = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    qnet.train()
    qnet(torch.randn(8, 3, 32, 32))  # statistics, then start every quantizer
    for _, m in quantizers(qnet):
        m.start()
    for m in qnet.modules():
        if hasattr(m, "sync_eps"):
            m.sync_eps()
    inet = integerize(qnet.eval(), input_eps(-3.0, 3.0), (1, 3, 32, 32))
    report = size_report(inet)
    assert report.totals == plan.totals()
    predicted = {r["layer"]: r for r in plan.cost_table().rows}
    for row in report.rows:
        assert predicted[row["layer"]] == row, row["layer"]


def test_apply_edits_n_levels_and_keeps_every_other_key():
    cfg = base()
    quantize = cfg["network"]["quantize"]
    quantize["PACTUnsignedAct"]["kwargs"]["init_clip"] = "percentile"
    quantize["harmonize"]["requant_pool"] = False
    quantize["PACTConv2d"]["features.3.residual_branch.1.0$"]["nb_std"] = 2.5
    plan = BitPlan.from_config(cfg)
    assert "avgpool_act" not in plan.a_bits  # requant_pool false: no pool requantizer
    plan.set_all(w_bits=4)  # activations stay as the config has them
    edited = plan.apply_to(cfg)
    eq = edited["network"]["quantize"]
    assert (
        eq["PACTUnsignedAct"]["kwargs"]["init_clip"] == "percentile"
        and eq["harmonize"]["requant_pool"] is False
    )
    # only bits written
    assert eq["PACTConv2d"]["features.3.residual_branch.1.0$"] == {"n_levels": 16, "nb_std": 2.5}
    assert edited["training"] == cfg["training"] and edited["data"] == cfg["data"]
    levels = levels_of(edited)
    assert levels["pilot.0"] == 16 and levels["pilot.2"] == 256 and levels["features.2.integer_add"] == 256
    # a regex that covers several layers is edited when they agree, refused when they do not
    cfg2 = copy.deepcopy(cfg)
    conv = cfg2["network"]["quantize"]["PACTConv2d"]
    for key in [k for k in conv if k.startswith("features.1.")]:
        del conv[key]
    conv[r"features\.1\.residual_branch\.\d\.0$"] = {}
    plan2 = BitPlan.from_config(cfg2)
    plan2.set_all(w_bits=6)
    assert cfg2 and plan2.apply_to(cfg2)["network"]["quantize"]["PACTConv2d"][
        r"features\.1\.residual_branch\.\d\.0$"
    ] == {"n_levels": 64}
    plan2.set("features.1.residual_branch.0.0", w_bits=3)
    with pytest.raises(ConfigError, match=r"features\\\\\.1.*covers.*different n_levels.*one by one"):
        plan2.apply_to(cfg2)


def test_plan_config_builds_the_network_it_describes():
    plan = BitPlan.from_config(base())
    plan.set_all(4, 4)
    plan.set_first_last(8, 8)
    plan.set_kind("depthwise", 6, 5)
    plan.set("features.2.residual_branch.2.0", per_channel=False)
    cfg = plan.apply_to(base())
    qnet, report = pact_recipe(embedded_net(), cfg["network"]["quantize"])
    levels = {r["name"]: r["n_levels"] for r in report}
    assert levels["pilot.0"] == levels["classifier.1"] == 256 and levels["pilot.2"] == 256
    assert levels["features.3.residual_branch.1.0"] == 64 and levels["features.3.residual_branch.1.2"] == 32
    assert levels["features.3.residual_branch.0.0"] == 16 and levels["features.3.residual_branch.0.2"] == 16
    assert levels["features.2.integer_add"] == 16
    modules = dict(qnet.named_modules())
    assert modules["features.2.residual_branch.2.0"].quantize == "per_layer"
    assert modules["features.3.residual_branch.2.0"].quantize == "per_channel"
    assert modules["features.3.residual_branch.0.0"].init_clip == "max"  # kept from the base config
    assert not modules["pilot.0"].tqt


def test_tqt_base_config_keeps_tqt():
    plan = BitPlan.from_config(base(TQT))
    plan.set_all(4, 4)
    qnet, _ = pact_recipe(embedded_net(), plan.apply_to(base(TQT))["network"]["quantize"])
    assert all(m.tqt for _, m in quantizers(qnet))


def test_cost_formulas():
    assert weight_bytes(27, 4) == 14 and weight_bytes(10, 8, bias=2) == 18
    assert act_bytes(5, 3) == 2 and bops(100, 4, 8) == 3200


def test_editor_rows_bulk_totals_and_saved_config(tmp_path):
    editor = BitWidthEditor(base())
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
    assert "saved" in editor.save_status.value and editor.message.value == ""
    saved = json.loads((tmp_path / "config.custom.json").read_text())
    assert "Mixed precision" in saved["description"] and "17 at 6, 1 at 4" in saved["description"]
    assert saved["name"] == editor.name() == "embedded-pact-mixed-W4-8-A3-8"  # the plan, not the base's name
    levels = levels_of(load_config(tmp_path / "config.custom.json", {"network.pretrained": None}))
    assert levels["features.5.residual_branch.0.0"] == 16 and levels["features.5.residual_branch.0.2"] == 8
    assert levels["features.4.residual_branch.1.0"] == 64
    assert saved["training"] == {k: v for k, v in base()["training"].items()}


def test_editor_outputs_follow_edits_and_refuse_invalid_bits(tmp_path):
    """The cost table, the chart and the save status below the editor change with every edit; 1 bit is refused
    next to its box and the plan keeps the last valid value; byte counts are integers."""
    editor = BitWidthEditor(base(), save_to=tmp_path / "config.json")
    layer = "features.5.residual_branch.0.0"
    costs, chart = editor.costs.value, editor.chart.value
    assert "not saved yet" in editor.save_status.value
    editor.save()
    assert "saved" in editor.save_status.value and (tmp_path / "config.json").is_file()
    editor.rows[layer][0].value = 4
    assert editor.costs.value != costs and editor.chart.value != chart
    assert "edited since saved" in editor.save_status.value
    weight = next(c for c in editor.plan.costs() if c["name"] == layer)["weight_bytes"]
    assert f"<td>{layer}</td><td>pointwise</td><td>4</td><td>8</td><td>{weight:,}</td>" in editor.costs.value
    editor.rows[layer][0].value = 1
    assert "W 1 bit: choose 2 to 16" in editor.notes[layer].value and editor.plan[layer].w_bits == 4
    editor.rows[layer][0].value = 3
    assert editor.notes[layer].value == "" and editor.plan[layer].w_bits == 3
    editor.bulk_w.value = 17
    editor.bulk_apply.click()
    assert "choose 2 to 16" in editor.bulk_note.value and editor.plan[layer].w_bits == 3


def test_editor_reports_invalid_saves(tmp_path):
    editor = BitWidthEditor(base())
    (tmp_path / "file").write_text("")
    editor.save_path.value = str(tmp_path / "file" / "config.json")  # a file where a folder must be
    editor.save_button.click()
    assert "not saved" in editor.message.value


def test_propose_fills_the_rows_within_the_budget_and_a_bad_budget_is_a_message(monkeypatch):
    """The editor's propose step with a synthetic sensitivity (the measured one is test_sensitivity's): the
    rows, the plan and the saved config take the allocation's bits, the totals stay within the budget, and a
    budget that cannot be met is a message under the budget box, the plan unchanged."""
    import labkit.lab.widgets as widgets
    from labkit.precision.allocate import allocate

    from helpers import random_sensitivity

    def fake_propose(cfg, budget, bits, n_calib):
        plan = BitPlan.from_config(cfg)
        return allocate(plan, random_sensitivity(plan, bits, seed=3), budget)

    monkeypatch.setattr(widgets, "propose", fake_propose)
    editor = BitWidthEditor.start(base(ROOT / "configs" / "embedded" / "config.pact.4b.json"), 4, 8)
    budget = "weight_bytes=uniform:3,act_bytes=uniform:3"
    allocation = editor.propose(budget, bits=(2, 3, 4, 8), n_calib=8)
    assert editor.plan.w_bits == allocation.plan.w_bits and editor.plan.a_bits == allocation.plan.a_bits
    for row in editor.plan.rows:
        w, a, _ = editor.rows[row.name]
        assert w.value == allocation.plan.w_bits[row.name]
        assert a.disabled or a.value == allocation.plan.a_bits[row.act]
    totals = editor.plan.totals()
    assert set(allocation.budget) == {"weight_bytes", "act_bytes"}
    assert all(totals[m] <= limit for m, limit in allocation.budget.items())
    assert len(set(allocation.plan.w_bits.values())) > 1  # a mixed plan, not uniform 3
    assert "&le;" in editor.propose_status.value and editor.budget_box.value == budget
    assert BitPlan.from_config(editor.config()).w_bits == allocation.plan.w_bits

    before = copy.deepcopy((editor.plan.w_bits, editor.plan.a_bits))
    editor.budget_box.value = "weight_bytes=10"
    editor._propose_clicked()
    assert "weight_bytes" in editor.propose_status.value and "color:#b00" in editor.propose_status.value
    assert (editor.plan.w_bits, editor.plan.a_bits) == before
