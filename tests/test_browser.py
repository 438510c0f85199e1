"""Notebooks in a real browser: JupyterLab on localhost, notebooks 03 and 06 in headless Chromium.

A private JupyterLab (free port, token, temporary root, config and runtime folders) serves a copy of
``notebooks/06_mixed_precision.ipynb``; Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) runs
all its cells through the Run menu, waits for the ipywidgets editor, types a new W bits value into one layer's
row and clicks the bulk *apply* button. After each edit the rendered totals line must equal what the same
editor computes in this process for the same edit, and the cost table below the editor must change with it.
Notebook 03 trains two epochs: its live clip plot must show (axes) while the training cell still runs, before
the first epoch's line, and no cell may show a stderr box. Screenshots land in ``test-artifacts/`` (the
README's pictures: ``scripts/make_screenshots.py`` copies them to ``docs/img``).

Not skipped when Chromium or Playwright is missing: it fails and says how to install them.
"""

from __future__ import annotations

import pytest

from helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "06_mixed_precision.ipynb"
TRAINING = ROOT / "notebooks" / "03_pact_training.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
PARAMETERS = {"config": "configs/embedded/config.pact.json", "bits": 4, "first_last_bits": 8,
              # no budget: Run All leaves the plan as started
              "depthwise_bits": None, "epochs": 0, "budget": None}
BUDGET = "weight_bytes=uniform:3,act_bytes=uniform:3"  # typed into the propose bar


def expected_editor():
    """The editor notebook 06 builds with PARAMETERS, built here without a browser."""
    from labkit.lab import steps
    from labkit.lab.widgets import BitWidthEditor

    p = PARAMETERS
    return BitWidthEditor.start(steps.run_config(p["config"]), p["bits"], p["first_last_bits"],
                                p["depthwise_bits"])


@pytest.mark.slow
def test_widget_editor_in_jupyterlab(tmp_path):  # noqa: PLR0915 (one browser session, step by step)
    import browser

    missing = browser.missing_requirements()
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: {browser.INSTALL_HINT}", pytrace=False)

    editor = expected_editor()
    names = [row.name for row in editor.plan.rows]
    # the biggest layer the plan puts at `bits` (not the first or last): 4 -> 2 bits moves the weight total
    params = {g.name: g.params for g in editor.plan.layers}
    layer = max((r for r in editor.plan.rows[1:-1] if r.w_bits == PARAMETERS["bits"]),
                key=lambda r: params[r.name]).name
    new_bits = 2

    def expected_totals():
        return browser.normalize(editor.totals.value)

    parameters = dict(PARAMETERS, output_config=str(tmp_path / "config.mixed.json"))
    before_notebook = NOTEBOOK.read_bytes()
    with browser.open_notebook(NOTEBOOK, parameters=parameters,
                               failure_screenshot=ARTIFACTS / "widget-editor-failure.png") as lab:
        lab.run_all()
        rendered = lab.wait_for_editor(timeout=300)
        if rendered != expected_totals():
            raise lab.fail(f"initial totals differ from the editor's own:\n  browser: {rendered}\n"
                           f"  python:  {expected_totals()}")
        shown = lab.layer_names()
        if shown != names:
            raise lab.fail(f"expected a row per quantized layer ({len(names)}: {names[0]} ... {names[-1]}), "
                           f"the browser shows {len(shown)}: {shown}")

        # one layer's W bits, typed into its box
        costs_before = lab.cost_table()
        lab.set_bits(layer, w_bits=new_bits)
        editor.rows[layer][0].value = new_bits
        after_edit = lab.wait_for_totals_change(rendered)
        assert after_edit == expected_totals(), (
            f"after typing W bits {new_bits} for {layer}:\n  browser: {after_edit}\n  python:  "
            f"{expected_totals()}")
        assert (
            after_edit.split("·")[0] != rendered.split("·")[0]
        ), f"the weight total did not change: {after_edit}"
        assert lab.row(layer).locator("input[type=number]").first.input_value() == str(new_bits)
        costs_after = lab.cost_table()
        assert (
            costs_after != costs_before and f"{layer} {editor.plan[layer].kind} {new_bits} " in costs_after
        ), f"the cost table below the editor did not follow the edit of {layer}"
        lab.screenshot_editor(ARTIFACTS / "widget-editor.png")
        lab.screenshot_cell("editor.outputs", ARTIFACTS / "widget-costs.png")

        # the bulk bar: every layer to 8/8 bits
        lab.apply_bulk("all layers", 8, 8)
        editor.apply_bulk("all layers", 8, 8)
        after_bulk = lab.wait_for_totals_change(after_edit)
        assert (
            after_bulk == expected_totals()
        ), f"after the bulk apply (all layers 8/8):\n  browser: {after_bulk}\n  python:  {expected_totals()}"
        assert "(4.0x smaller than FP32)" in after_bulk

        # the propose bar: a budget typed and proposed fills the rows (the FP32 run and its sensitivity are
        # made on the first proposal, then cached beside the checkpoint, where this process reads them)
        lab.propose(BUDGET)
        after_propose = lab.wait_for_totals_change(after_bulk, timeout=1800)
        allocation = editor.propose(BUDGET)
        assert after_propose == expected_totals(), (
            f"after proposing for {BUDGET}:\n  browser: {after_propose}\n  python:  {expected_totals()}")
        totals = editor.plan.totals()
        assert all(totals[m] <= limit for m, limit in allocation.budget.items()), (totals, allocation.budget)
        shown_bits = {
            name: int(lab.row(name).locator("input[type=number]").first.input_value()) for name in names
        }
        assert shown_bits == allocation.plan.w_bits, "the rows do not show the proposed weight bits"
        assert len(set(shown_bits.values())) > 1, f"the proposal is uniform: {set(shown_bits.values())}"
        lab.screenshot_editor(ARTIFACTS / "widget-propose.png")

        collapsed = lab.collapsed_rows()
        stderr = lab.stderr_outputs()

    assert NOTEBOOK.read_bytes() == before_notebook, "the repository's notebook was modified"
    assert not collapsed, f"{len(collapsed)} editor rows drawn under 16 px tall: {collapsed[:3]}"
    assert not stderr, f"stderr boxes in notebook 06: {stderr[:3]}"


@pytest.mark.slow
def test_training_notebook_in_jupyterlab(tmp_path):
    """Notebook 03, two epochs into a fresh run folder: the live plot draws before the first epoch ends, no
    cell writes to stderr, and the clip-bound figures are captured for the README."""
    import browser

    missing = browser.missing_requirements()
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: {browser.INSTALL_HINT}", pytrace=False)
    # epoch 2 starts the activation quantizers
    parameters = {"epochs": 2, "output_dir": str(tmp_path / "pact")}
    with browser.open_notebook(TRAINING, parameters=parameters,
                               failure_screenshot=ARTIFACTS / "training-failure.png") as lab:
        lab.run_all()
        live = lab.wait_for_image("LiveClipPlot(", timeout=1800, while_running=True)
        assert (
            "epoch 1/2 " not in live and "epoch   1/2" not in live
        ), f"the plot came after the epoch: {live}"
        lab.wait_until_idle(timeout=3600)
        lab.screenshot_cell("LiveClipPlot(", ARTIFACTS / "live-clip-plot.png")
        lab.screenshot_cell("plot_clip_trajectories(read_history", ARTIFACTS / "clip-bounds.png")
        stderr = lab.stderr_outputs()
        done = browser.normalize(lab.cell("steps.what_we_saw").inner_text())
    assert not stderr, f"stderr boxes in notebook 03: {stderr[:3]}"
    assert "2 epochs in" in done, f"the last cell did not conclude the run: {done}"
