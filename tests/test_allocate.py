"""The bit allocation: optimal against brute force on a small network, budgets met as labkit.precision.costs
counts them, ties respected, clear errors; and its torch-free budget parser."""

import copy
import csv
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from labkit.cli import main
from labkit.config.budget import (
    BudgetError,
    bit_choices,
    budget_slug,
    describe_budget,
    format_budget,
    parse_budget,
)
from labkit.config.loading import load_config
from labkit.config.paths import resolve
from labkit.lab.plots import pareto_front, plot_pareto
from labkit.models import MobileNetV2
from labkit.precision.allocate import (
    allocate,
    predicted_increase,
    propose,
    resolve_budget,
    uniform_totals,
    with_default_floors,
)
from labkit.precision.bitplan import BitPlan
from labkit.precision.pareto import collect_points, late_drop, paired_table
from labkit.precision.sensitivity import CACHE, Sensitivity, cache_key
from labkit.quant.recipe import pact_recipe
from labkit.train.build import build_float_network
from labkit.train.checkpoint import make_checkpoint, save_atomic
from labkit.train.runs import RunFolder

from helpers import ROOT, random_sensitivity, small_plan

PACT4 = ROOT / "configs" / "embedded" / "config.pact.4b.json"


def all_plans(plan: BitPlan, w_choices, a_choices):
    """Every assignment of the layers' and groups' bits: ``(bits, totals)``, totals by
    labkit.precision.costs."""
    plan = copy.deepcopy(plan)
    layers, groups = list(plan.w_bits), list(plan.activation_groups())
    for combo in itertools.product(*([w_choices] * len(layers) + [a_choices] * len(groups))):
        for name, b in zip(layers, combo):
            plan.set(name, w_bits=b)
        for name, b in zip(groups, combo[len(layers):]):
            plan.set_quantizer(name, b)
        yield dict(zip(layers + groups, combo)), plan.totals()


def predicted(bits: dict, sens: Sensitivity) -> float:
    return sum((sens.weights.get(n) or sens.activations[n])[b] for n, b in bits.items())


def leaves(tree, prefix=()):
    """``{path: value}`` of every non-dict value of a nested dict."""
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, (*prefix, key)) if isinstance(value, dict) else {(*prefix, key): value})
    return out


def test_the_small_network_has_the_ties_the_allocation_respects():
    plan = small_plan()
    assert list(plan.w_bits) == ["conv1", "conv2", "conv3", "fc"]
    # the adder (inputs and output: one n_levels), act3 with the pool requantizer that follows it
    assert plan.activation_groups() == {"act1": ["act1"], "integer_add": ["integer_add"],
                                        "act3": ["act3", "pool_act"]}
    plan.set_quantizer("act3", 3)
    assert plan.a_bits["pool_act"] == 3


def test_allocation_equals_brute_force_on_a_small_network():
    plan = small_plan()
    w_choices, a_choices = (2, 4, 8), (2, 3, 8)
    plans = list(all_plans(plan, w_choices, a_choices))
    assert len(plans) == 3 ** 7
    rng = random.Random(0)
    budgets = []
    for metric in ("weight_bytes", "act_bytes", "BOPs"):
        values = sorted(t[metric] for _, t in plans)
        budgets += [{metric: values[int(q * (len(values) - 1))]} for q in (0.0, 0.1, 0.37, 0.6, 1.0)]
    for _ in range(6):  # several totals at once
        budgets.append({m: rng.choice([t[m] for _, t in plans]) for m in ("weight_bytes", "act_bytes",
                                                                          "BOPs")})
    checked = 0
    for seed, budget in enumerate(budgets):
        sens = random_sensitivity(plan, (2, 3, 4, 8), seed)
        feasible = [predicted(bits, sens) for bits, t in plans if all(t[k] <= v for k, v in budget.items())]
        if not feasible:
            with pytest.raises(BudgetError):
                allocate(plan, sens, budget, w_choices, a_choices)
            continue
        best = min(feasible)
        result = allocate(plan, sens, budget, w_choices, a_choices)
        assert result.objective == pytest.approx(best, abs=1e-9), budget
        assert all(result.totals[k] <= v for k, v in budget.items())
        assert result.totals == result.plan.totals() and result.budget == budget
        assert set(result.plan.w_bits.values()) <= set(w_choices)
        assert (
            result.plan.a_bits["pool_act"] == result.plan.a_bits["act3"]
            and result.plan.a_bits["input_quant"] == 8
        )
        checked += 1
    assert checked >= len(budgets) - 2
    assert set(plan.w_bits.values()) == {8}  # the input plan is not changed


def test_a_weight_scale_minimises_the_scaled_objective_and_reports_the_unscaled_one():
    plan = small_plan()
    w_choices, a_choices = (2, 4, 8), (2, 3, 8)
    plans = list(all_plans(plan, w_choices, a_choices))
    values = sorted(t["BOPs"] for _, t in plans)
    budget = {"BOPs": values[len(values) // 3]}
    sens = random_sensitivity(plan, (2, 3, 4, 8), 7)
    chosen = set()
    for scale in (1.0, 0.1, 0.01):
        scaled = copy.deepcopy(sens)
        scaled.weights = {n: {b: scale * v for b, v in by_bits.items()} for n,
                          by_bits in sens.weights.items()}
        feasible = [(predicted(bits, scaled), bits) for bits, t in plans if t["BOPs"] <= budget["BOPs"]]
        result = allocate(plan, sens, budget, w_choices, a_choices, weight_scale=scale)
        bits = {**result.plan.w_bits, **{g: result.plan.a_bits[g] for g in result.plan.activation_groups()}}
        assert predicted(bits, scaled) == pytest.approx(min(feasible, key=lambda f: f[0])[0], abs=1e-9)
        assert result.objective == pytest.approx(predicted(bits, sens), abs=1e-12)
        assert result.weight_scale == scale
        assert ("the weights' sensitivities x" in result.description()) == (scale != 1)
        chosen.add(tuple(sorted(result.plan.w_bits.items())))
    assert len(chosen) > 1  # a smaller weight scale moves bits from the activations to the weights' side
    with pytest.raises(ValueError, match="weight_scale 0: give a positive factor"):
        allocate(plan, sens, budget, weight_scale=0)


def test_structural_limits_equal_brute_force_over_the_plans_that_keep_them():
    """``min_bits``: a named layer's weights and the group it reads take at least B bits (``last``: fc, which
    reads the pool requantizer of act3's group; ``conv2`` reads act1), a named activation's group too."""
    plan = small_plan()
    w_choices, a_choices = (2, 4, 8), (2, 3, 8)
    floors = {"fc": 4, "act3": 4, "conv2": 8, "act1": 8, "integer_add": 3}
    plans = [(bits, t) for bits, t in all_plans(plan, w_choices, a_choices)
             if all(bits[name] >= b for name, b in floors.items())]
    budget = {"weight_bytes": sorted(t["weight_bytes"] for _, t in plans)[len(plans) // 3]}
    spec = {**budget, "min_bits:last": 4, "min_bits:conv2": 8, "min_bits:integer_add$": 3}
    for seed in range(4):
        sens = random_sensitivity(plan, (2, 3, 4, 8), seed)
        best = min(predicted(bits, sens) for bits, t in plans if t["weight_bytes"] <= budget["weight_bytes"])
        result = allocate(plan, sens, spec, w_choices, a_choices)
        assert result.objective == pytest.approx(best, abs=1e-9)
        assert result.plan.w_bits["fc"] >= 4 and result.plan.a_bits["pool_act"] >= 4
        assert result.plan.w_bits["conv2"] == 8 and result.plan.a_bits["act1"] == 8
        assert result.plan.a_bits["integer_add"] >= 3
    first = allocate(plan, random_sensitivity(plan, (2, 3, 4, 8), 9), {**budget, "min_bits:first": 8})
    # the input keeps its bits
    assert first.plan.w_bits["conv1"] == 8 and first.plan.a_bits["input_quant"] == 8


def test_a_budget_no_plan_meets_is_refused_before_anything_is_measured(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr("labkit.precision.allocate.measure_sensitivity", measure)
    cfg = load_config(PACT4, {"network.pretrained": "no/such/run/best.ckpt"}, check_files=False)
    cheapest = uniform_totals(BitPlan.from_config(cfg), 2, 2)["weight_bytes"]
    without_floors = {"min_bits:first": 2, "min_bits:last": 2}  # the default structural limits lowered
    with pytest.raises(BudgetError, match=f"weight_bytes <= {cheapest - 1:,} cannot be met: even every "
                                          "weight at 2"):
        propose(cfg, {"weight_bytes": cheapest - 1, **without_floors})
    with pytest.raises(BudgetError, match=r"cannot be met: even the fewest allowed bits everywhere \(weights "
                                          r"2, "
                       r"activations 2\) with the structural limits \(min_bits; lower one by stating it"):
        propose(cfg, {"weight_bytes": cheapest})  # the default limits cost more than all at 2 bits
    with pytest.raises(BudgetError, match="cannot be met: even the fewest allowed bits everywhere "
                                          ".*structural limits"):
        propose(cfg, "weight_bytes=uniform:3,min_bits:features=8")
    with pytest.raises(BudgetError, match="min_bits:nothing names no layer or activation of this network"):
        propose(cfg, "weight_bytes=uniform:3,min_bits:nothing=4")
    with pytest.raises(BudgetError, match="must take at least 8 bits, but the allowed bits are 2, 3, 4"):
        propose(cfg, "weight_bytes=uniform:3,min_bits:last=8", bits=(2, 3, 4))
    with pytest.raises(AssertionError, match="measured"):  # a feasible budget goes on to the measurement
        propose(cfg, "weight_bytes=uniform:3,min_bits:last=8")


def test_uniform_budgets_and_monotone_objective():
    plan = small_plan()
    sens = random_sensitivity(plan, (2, 3, 4, 8), 1)
    limits = resolve_budget(plan, {"weight_bytes": "uniform:3", "BOPs": "uniform:3/4"})
    three = copy.deepcopy(plan)
    three.set_all(3, 3)
    mixed = copy.deepcopy(plan)
    mixed.set_all(3, 4)
    assert limits == {"weight_bytes": three.totals()["weight_bytes"], "BOPs": mixed.totals()["BOPs"]}
    objectives = [allocate(plan, sens, {"weight_bytes": f"uniform:{b}"}).objective for b in (2, 3, 4, 8)]
    assert objectives == sorted(objectives, reverse=True)  # a larger budget never predicts more loss
    # at the uniform-3 budget the uniform-3 plan is feasible, so the optimum predicts no more than it
    result = allocate(plan, sens, "weight_bytes=uniform:3,act_bytes=uniform:3")
    assert result.objective <= predicted_increase(three, sens) + 1e-12


def test_allocation_errors_name_the_problem():
    plan = small_plan()
    sens = random_sensitivity(plan, (2, 4, 8), 2)
    cheapest = uniform_totals(plan, 2, 2)  # the smallest cost any plan of 2/4/8 bits has: named in the error
    for metric in ("weight_bytes", "act_bytes", "BOPs"):
        with pytest.raises(BudgetError, match=f"{metric} <= {cheapest[metric] - 1:,} cannot be met: even "
                           f"every weight at 2 and every activation at 2 bits costs {cheapest[metric]:,}; "
                           "raise the budget"):
            allocate(plan, sens, {metric: cheapest[metric] - 1})
        # that cost fits
        assert allocate(plan, sens, {metric: cheapest[metric]}).totals[metric] == cheapest[metric]
    with pytest.raises(BudgetError, match=r"measured at 2, 4, 8 bits only"):
        allocate(plan, sens, {"weight_bytes": 1e6}, w_bits=(3, 4))
    other = Sensitivity((2, 4, 8), 8, 0.1, {"conv1": {2: 0, 4: 0, 8: 0}}, {}, "x", "x")
    with pytest.raises(BudgetError, match="no weight layer 'conv2'.*measure it with this config"):
        allocate(plan, other, {"weight_bytes": 1e6})


def test_proposal_on_the_embedded_network_edits_the_base_config():
    cfg = load_config(PACT4, {"network.pretrained": None})
    plan = BitPlan.from_config(cfg)
    sens = random_sensitivity(plan, (2, 3, 4, 8), 3)
    # the largest layer costs nothing to lower
    sens.weights["features.17.0"] = {2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0}
    result = allocate(plan, sens, "weight_bytes=uniform:3,act_bytes=uniform:3")
    assert result.plan.w_bits["features.17.0"] == 2
    assert result.totals["weight_bytes"] <= resolve_budget(plan,
                                                           {"weight_bytes": "uniform:3"})["weight_bytes"]
    edited = result.config()
    assert edited["description"].startswith("Proposed mixed precision")
    assert edited["training"] == cfg["training"] and edited["data"] == cfg["data"]
    _, report = pact_recipe(MobileNetV2(**edited["network"]["kwargs"]), edited["network"]["quantize"])
    levels = {r["name"]: r["n_levels"] for r in report}
    for layer, b in result.plan.w_bits.items():
        assert levels[layer] == 2 ** b
    for group, b in result.plan.a_bits.items():
        if group != "input_quant":
            assert levels[group] == 2 ** b
    assert "features.17.0" in str(result.table()) and "predicted" in result.summary()


def test_parse_budget():
    assert parse_budget("weight_bytes=uniform:3, BOPs=2.5e8") == {"weight_bytes": (3, 3), "BOPs": 2.5e8}
    assert parse_budget(["act_bytes=uniform:2/4", "weight_bytes=1000"]) == {"act_bytes": (2, 4),
                                                                            "weight_bytes": 1000}
    assert parse_budget({"BOPs": "uniform:4"}) == {"BOPs": (4, 4)}
    limited = parse_budget(r"BOPs=uniform:3, min_bits:last=4, min_bits:features\.17\.2$ = 8")
    assert limited == {"BOPs": (3, 3), "min_bits:last": 4, "min_bits:features\\.17\\.2$": 8}
    assert parse_budget(format_budget(limited)) == limited
    assert describe_budget(limited) == r"BOPs<=uniform:3, last>=4 bits, features\.17\.2$>=8 bits"
    assert budget_slug(limited) == "BOPs-u3_min-last-4_min-features.17.2-8"
    spec = parse_budget("weight_bytes=uniform:3,act_bytes=uniform:2/4,BOPs=250000000")
    assert budget_slug(spec) == "weight_bytes-u3_act_bytes-u2-4_BOPs-250000000"
    assert describe_budget(spec) == "weight_bytes<=uniform:3, act_bytes<=uniform:2/4, BOPs<=250,000,000"
    for bad, message in (("weight_byte=100", "did you mean 'weight_bytes'"), ("weight_bytes", "has no '='"),
                         ("weight_bytes=-5", "not a limit"),
                         ("BOPs=uniform:1", "not a bit-width from 2 to 16"),
                         ("BOPs=uniform:2/3/4", "uniform:B or uniform:W/A"), ("", "empty"),
                         ("BOPs=1,BOPs=2", "given twice"), ("act_bytes=lots", "not a limit"),
                         ("min_bits:last=4", "structural limits only"),
                         ("BOPs=1,min_bits:=4", "names no layer"),
                         ("BOPs=1,min_bits:last=1", "not a bit-width from 2 to 16"),
                         ("BOPs=1,min_bits:(=4", "is not a regex"),
                         ("BOPs=1,min_bits:last=4,min_bits:last=8", "given twice")):
        with pytest.raises(BudgetError, match=message):
            parse_budget(bad)
    assert bit_choices([8, 2, 4]) == (2, 4, 8) and bit_choices(3) == (3,)
    for bad in ([2, 2], [1, 4], [], ["x"], [True]):
        with pytest.raises(BudgetError, match="give distinct bit-widths from 2 to 16"):
            bit_choices(bad, "--w-bits")


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """A random embedded checkpoint whose sensitivity.json already holds a (synthetic) entry for bits 2 3 4 8
    and 8 calibration images: ``labkit plan`` then reads it instead of measuring."""
    cfg = load_config(PACT4, check_files=False)
    folder = tmp_path_factory.mktemp("fp32")
    torch.manual_seed(0)
    save_atomic(make_checkpoint(build_float_network(cfg).state_dict(), {}), folder / "best.ckpt")
    sens = random_sensitivity(BitPlan.from_config(cfg), (2, 3, 4, 8), 4)
    sens.key, sens.checkpoint, sens.n_calib = cache_key(cfg, folder / "best.ckpt", (2, 3, 4, 8),
                                                        8), "random", 8
    (folder / CACHE).write_text(json.dumps({sens.key: sens.as_json()}))
    return cfg, folder, sens


def test_cli_plan_writes_the_proposed_config(cached_run, tmp_path, capsys):
    cfg, folder, sens = cached_run
    out = tmp_path / "plan.json"
    assert main(["plan", str(PACT4), "--run", str(folder), "--budget", "weight_bytes=uniform:3",
                 "--budget", "act_bytes=uniform:3", "--calib", "8", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "[cached]" in printed
        and f"wrote {out}" in printed
        and "predicted calibration-loss increase" in printed
    )
    proposed = load_config(out, {"network.pretrained": None})
    plan = BitPlan.from_config(proposed)
    limits = resolve_budget(plan, {"weight_bytes": "uniform:3", "act_bytes": "uniform:3"})
    assert all(plan.totals()[k] <= v for k, v in limits.items())
    expected = allocate(BitPlan.from_config(cfg), sens,  # with the default structural limits, which it keeps
                        with_default_floors(parse_budget("weight_bytes=uniform:3,act_bytes=uniform:3")))
    assert (
        plan.w_bits["pilot.0"] == 8 and plan.w_bits["classifier.1"] >= 4 and plan.a_bits["avgpool_act"] >= 4
    )
    assert plan.w_bits == expected.plan.w_bits and plan.a_bits == expected.plan.a_bits
    # edited from the base config: every key kept, only bits (n_levels / per-layer quantize) and the
    # description changed or added, and only in network.quantize
    base, written = leaves(json.loads(PACT4.read_text())), leaves(json.loads(out.read_text()))
    assert set(base) <= set(written)
    edits = {p for p in written if written[p] != base.get(p, object())}
    assert ("description",) in edits and written["description",].startswith("Proposed mixed precision")
    assert Path(written["network", "pretrained"]).is_absolute()  # config paths are recorded absolute
    assert Path(written["network", "pretrained"]) == resolve(base["network", "pretrained"])
    assert all(p[:2] == ("network", "quantize") and p[-1] in ("n_levels", "quantize")
               for p in edits - {("description",), ("network", "pretrained")})
    assert any(p[-1] == "n_levels" for p in edits)


@pytest.mark.parametrize("argv,message", [
    (["--budget", "weight_byte=uniform:3"], "did you mean 'weight_bytes'"),
    (["--budget", "BOPs=uniform:3", "--bits", "1", "4"], "--bits 1 4: give distinct bit-widths from 2 to 16"),
    (["--budget", "BOPs=uniform:3", "--run", "no/such/run"], "run 'no/such/run' not found"),
])
def test_cli_plan_reports_bad_input_in_one_line(argv, message, tmp_path, capsys):
    assert main(["plan", str(PACT4), "-o", str(tmp_path / "p.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_plan_needs_a_quantized_config(tmp_path, capsys):
    assert main(["plan", str(ROOT / "configs" / "embedded" / "config.fp32.json"), "--budget", "BOPs=1e9",
                 "-o", str(tmp_path / "p.json")]) == 2
    assert "has no network.quantize" in capsys.readouterr().err


def test_pareto_points_group_seeds_and_place_plans_by_cost(cached_run, tmp_path):
    cfg, _, sens = cached_run
    uniform = copy.deepcopy(cfg)
    uniform.pop("name")
    proposal = allocate(BitPlan.from_config(cfg), sens, "weight_bytes=uniform:3").config()
    fp32 = load_config(ROOT / "configs" / "embedded" / "config.fp32.json", check_files=False)
    runs = [("u-s0", uniform, 0, 97.0), ("u-s1", uniform, 1, 98.0), ("p-s0", proposal, 0, 99.0),
            ("fp32", fp32, 0, 99.5), ("u-s2", uniform, 2, 10.0)]
    for name, config, seed, top1 in runs:
        last = config["training"]["n_epochs"] - (2 if name == "u-s2" else 1)  # u-s2 stopped an epoch early
        with RunFolder(tmp_path / name).writing() as run:
            run.write_config({**config, "training": {**config["training"], "seed": seed}})
            run.write_history([{"epoch": e, "valid": {"top1": top1},
                                "best_top1": top1} for e in range(last + 1)])
    table = collect_points([tmp_path])
    assert table.title.endswith("left out, unfinished: u-s2")
    rows = {r["label"]: r for r in table.rows}
    assert set(rows) == {"PACT W4/A4", "PACT proposed, weight_bytes<=uniform:3", "FP32"}
    u = rows["PACT W4/A4"]
    assert (u["kind"], u["n"], u["top1"], u["top1_min"], u["top1_max"], u["seeds"]) == ("uniform", 2, 97.5,
                                                                                        97, 98, "0 1")
    assert u["top1s"] == [97.0, 98.0]
    assert u["weight_bytes"] == BitPlan.from_config(cfg).totals()["weight_bytes"]
    p = rows["PACT proposed, weight_bytes<=uniform:3"]
    assert p["kind"] == "proposed" and p["weight_bytes"] <= resolve_budget(
        BitPlan.from_config(cfg), {"weight_bytes": "uniform:3"})["weight_bytes"]
    assert rows["FP32"]["kind"] == "fp32" and rows["FP32"]["weight_bytes"] is None
    assert [r["label"] for r in pareto_front([u, p], "weight_bytes")] == [p["label"]]  # cheaper and better
    fig = plot_pareto(table, "weight_bytes")
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} >= {"uniform", "proposed",
                                                                            "FP32 99.50% (n=1)"}
    ticks = [c.get_offsets().tolist() for c in fig.axes[0].collections if len(c.get_offsets()) == 2]
    # a tick per seed of the 2-seed plan
    assert [[u["weight_bytes"], 97.0], [u["weight_bytes"], 98.0]] in ticks


def test_paired_table_compares_plan_and_uniform_seed_by_seed(tmp_path):
    cfg = load_config(PACT4, check_files=False)  # activations start in epoch 1 (0-based)
    budget = "weight_bytes=uniform:3,act_bytes=uniform:3"
    finals = {("w3a3", 0): [99.0, 90.0, 93.0, 92.0], ("w3a3", 1): [99.0, 95.0, 96.0, 95.0],
              ("plan", 0): [99.0, 94.0, 97.0, 96.5], ("plan", 1): [99.0, 96.0, 94.0, 94.5],
              ("w4a4", 0): [99.0, 98.0, 98.0, 98.0]}
    rows = []
    for (name, seed), top1s in finals.items():
        run = f"{name}-s{seed}"
        with RunFolder(tmp_path / run).writing() as folder:
            folder.write_config(cfg)
            folder.write_history([{"epoch": e, "valid": {"top1": t}} for e, t in enumerate(top1s)])
        rows.append({"run": run, "algorithm": "pact.4b", "bits": {"w3a3": 3, "w4a4": 4}.get(name, ""),
                     "budget": budget if name == "plan" else "", "seed": seed, "status": "ok",
                     "final_top1": top1s[-1]})
    rows.append({**rows[0], "run": "w3a3-s2", "seed": 2, "status": "failed", "final_top1": ""})  # no pair
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = paired_table(tmp_path)
    (row,) = table.rows  # paired with W3/A3 (the budget's uniform:3), not W4/A4
    assert (row["reference"], row["n"], row["wins"]) == ("pact.4b W3/A3", 2, "1/2")
    assert row["plan_top1"] == pytest.approx(95.5) and row["reference_top1"] == pytest.approx(93.5)
    assert row["diff"] == pytest.approx(2.0) and row["diff_min"] == pytest.approx(-0.5)
    assert row["diff_std"] == pytest.approx(((4.5 - 2) ** 2 + (-0.5 - 2) ** 2) ** 0.5)
    assert row["worst_drop"] == pytest.approx(1.5)  # plan-s1: best 96 (epoch 1) -> 94.5 final
    assert row["per_seed"] == "s0: 96.50 vs 92.00 (+4.50); s1: 94.50 vs 95.00 (-0.50)"
    assert late_drop(tmp_path / "w3a3-s0") == pytest.approx(1.0)  # epoch 0 (weights only) is not counted


def test_pareto_plot_without_runs_says_so_and_warns_nothing(tmp_path):
    import warnings

    table = collect_points([tmp_path])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legend without artists would warn in the notebook's stderr
        fig = plot_pareto(table, "weight_bytes")
    ax = fig.axes[0]
    assert ax.get_legend() is None and any("no trained runs yet" in t.get_text() for t in ax.texts)
