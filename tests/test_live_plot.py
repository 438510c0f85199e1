"""The notebooks' live clip-bound plot redraws within its share of the training time."""

from types import SimpleNamespace

import pytest

from labkit.lab import plots


def simulate(monkeypatch, draw_s: float, interval: float = 3.0, budget: float = 0.05, batches: int = 40):
    """Two epochs of ``batches`` 1-second batches under a fake clock; every redraw takes ``draw_s``.
    Returns ``(batch index of every mid-epoch redraw, per epoch; titles of every redraw)``."""
    now = [100.0]
    monkeypatch.setattr(plots, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def slow_plot(points, title, fig):
        now[0] += draw_s
        return title

    monkeypatch.setattr(plots, "plot_clip_trajectories", slow_plot)
    live = plots.LiveClipPlot("t", interval=interval, budget=budget)
    shown: list[str] = []
    live.handle = SimpleNamespace(update=shown.append)
    drawn: list[list[int]] = []
    for epoch in range(2):
        drawn.append([])
        for batch in range(batches):
            before = len(shown)
            live.on_batch({"epoch": epoch, "batch": batch, "batches": batches, "train": {"loss": 1.0},
                           "quant": dict})
            if len(shown) > before:
                drawn[-1].append(batch)
            now[0] += 1.0
        live({"epoch": epoch, "quant": {}, "valid": {"top1": 50.0}})
    return drawn, shown


def test_a_slow_redraw_waits_draw_time_over_budget(monkeypatch):
    drawn, shown = simulate(monkeypatch, draw_s=0.5)
    # after a 0.5 s redraw the next one waits max(3, 0.5 / 0.05) = 10 s: 10 batches of 1 s
    assert drawn[0] == [0, 10, 20, 30]
    assert all(b - a == 10 for a, b in zip(drawn[1], drawn[1][1:]))
    assert sum("done" in t for t in shown) == 2  # every epoch's end is drawn
    mid_epoch = 0.5 * sum(len(d) for d in drawn)
    assert mid_epoch <= 0.05 * (2 * 40 + 0.5 * len(shown))  # within the budget of the elapsed time


def test_a_fast_redraw_keeps_the_interval(monkeypatch):
    drawn, _ = simulate(monkeypatch, draw_s=0.125)  # 0.125 / 0.05 = 2.5 s < the 3 s interval
    assert drawn[0] == list(range(0, 40, 3))


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_a_budget_outside_0_1_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        plots.LiveClipPlot("t", budget=budget)
