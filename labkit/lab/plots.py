"""matplotlib figures drawn from run histories and networks (they read; they never train or mutate).

Figures use constrained layout (titles never overlap), integer epoch ticks, and name the layers that move
most. Notebooks get them wrapped in :class:`Plot`: a PNG with a one-line description as its text, not a figure
repr.
"""

from __future__ import annotations

import io
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import DisplayHandle
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator
from torch import nn

from labkit.train.runs import read_history

#: layers labelled per clip panel: the ones whose bound moved most (relative to its first value)
TOP_K = 3
PANEL_TITLES = {("activations", "hi"): "activation clip bound (alpha)",
                ("weights", "hi"): "weight clip bound",
                ("activations", "log2_t"): "activation log2 t (TQT)"}


def plot_training_curves(history: list[dict], title: str = "", axes=None):
    """Loss (left) and top-1 (right) per epoch, train and valid. Returns the figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    else:
        fig = axes[0].figure
        for ax in axes:
            ax.clear()
    epochs = [r["epoch"] + 1 for r in history]
    for split, style in (("train", "--"), ("valid", "-")):
        axes[0].plot(epochs, [r[split]["loss"] for r in history], style, marker="o", label=split)
        axes[1].plot(epochs, [r[split]["top1"] for r in history], style, marker="o", label=split)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="top-1")
    for ax in axes:
        _epoch_axis(ax)
        ax.legend()
    if title:
        fig.suptitle(title)
    return Plot(fig, f"{title or 'loss and top-1'} ({len(history)} epochs)")


def _epoch_axis(ax, last: float | None = None) -> None:
    """Integer epoch ticks; with ``last`` (the largest x drawn) the axis spans epoch 0 to at least 1."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last is not None:
        ax.set_xlim(0, max(1.0, last) * 1.04)
    ax.grid(alpha=0.3)


class Plot:
    """A drawn figure for notebooks: PNG, and ``text`` (one line saying what it shows) instead of matplotlib's
    ``<Figure size ...>``; ``figure`` is the matplotlib figure (``savefig`` passes through)."""

    def __init__(self, figure, text: str):
        self.figure, self.text = figure, text
        plt.close(figure)  # shown through this object only, never again by the inline backend

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=80)
        return buf.getvalue()

    def savefig(self, *args, **kwargs):
        return self.figure.savefig(*args, **kwargs)

    def __repr__(self) -> str:
        return self.text


def _layer_groups(history: list[dict]) -> dict[str, list[str]]:
    """Quantizer names of the last record by ``kind``: ``{"activations": [...], "weights": [...]}``."""
    quant = history[-1].get("quant", {}) if history else {}
    return {kind: [n for n, s in quant.items() if s.get("kind", "activations") == kind]
            for kind in ("activations", "weights")}


def _series(history: list[dict], name: str, key: str) -> list[tuple[float, float]]:
    """``(x, value)`` of one quantizer over the records; ``x`` is ``record["x"]`` (a fraction of an epoch,
    live plots) or the epoch count."""
    points = [(r.get("x", r["epoch"] + 1),
               r["quant"][name].get(key)) for r in history if name in r.get("quant", {})]
    return [(x, v) for x, v in points if v is not None]


def top_movers(series: dict[str, list[tuple[float, float]]], k: int = TOP_K,
               relative: bool = True) -> list[str]:
    """The ``k`` names whose value moved most from its first point (relative to that value, or absolute)."""
    def moved(points):
        first, last = points[0][1], points[-1][1]
        return abs(last - first) / (max(abs(first), 1e-12) if relative else 1.0)
    return sorted((n for n, p in series.items() if len(p) > 1 and moved(p) > 0),
                  key=lambda n: -moved(series[n]))[:k]


def plot_clip_trajectories(history: list[dict], layers: list[str] | None = None, title: str = "", fig=None):
    """Clipping bounds per quantized layer: activation ``hi`` (alpha), weight ``hi`` (mean over channels), and
    ``log2 t`` when the run is TQT. Every layer a grey line; the :data:`TOP_K` that moved most in colour,
    named."""
    groups = _layer_groups(history)
    if layers is not None:
        groups = {k: [n for n in v if n in layers] for k, v in groups.items()}
    tqt = any("log2_t" in s for r in history for s in r.get("quant", {}).values())
    panels = [("activations", "hi"), ("weights", "hi")] + ([("activations", "log2_t")] if tqt else [])
    if fig is None:
        fig = plt.figure(figsize=(5 * len(panels), 4.2), layout="constrained")
    fig.clear()
    axes = fig.subplots(1, len(panels))
    for ax, (group, key) in zip(axes, panels):
        series = {n: _series(history, n, key) for n in groups[group]}
        series = {n: p for n, p in series.items() if p}
        named = top_movers(series, relative=key != "log2_t")  # log2 t: already relative
        for name, points in series.items():
            if name not in named:
                ax.plot(*zip(*points), color="0.75", lw=0.8, marker=".", markersize=2)
        for name in named:
            ax.plot(*zip(*series[name]), lw=1.8, marker=".", label=name)
        ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=PANEL_TITLES[group, key])
        _epoch_axis(ax, max((p[-1][0] for p in series.values()), default=None))
        if named:
            ax.legend(title=f"moved most (of {len(series)})", fontsize=7, title_fontsize=7, loc="best")
        elif series:
            ax.text(0.5, 0.02, f"{len(series)} layers; none moved yet", transform=ax.transAxes, ha="center",
                    color="0.4", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values yet", transform=ax.transAxes, ha="center", color="0.5")
    if title:
        fig.suptitle(title)
    n = len(groups["activations"]) + len(groups["weights"])
    return Plot(fig, f"{title or 'clipping bounds'} ({n} quantizers, {len(history)} points)")


def plot_quantized_histogram(values: torch.Tensor, lo: float, hi: float, n_levels: int, title: str = "",
                             ax=None,
                             bounds: str = "clip bounds", outside: float | None = None):
    """Histogram of ``values`` with the clip bounds ``lo``/``hi`` (legend: ``bounds``, i.e. whose they are)
    and, for <= 64 levels, the grid ``lo + k eps``. ``outside``: the share (%) of values outside their own
    bounds (default: outside ``lo``/``hi``)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    v = values.detach().flatten().float().cpu()
    span = max(hi - lo, 1e-12)
    ax.hist(v.numpy(), bins=120, range=(min(float(v.min()), lo - 0.1 * span),
                                        max(float(v.max()), hi + 0.1 * span)),
            color="#4c72b0", alpha=0.8, log=True)
    if n_levels <= 64:
        eps = (hi - lo) / (n_levels - 1)
        for k in range(n_levels):
            ax.axvline(lo + k * eps, color="0.6", lw=0.4)
    ax.axvline(lo, color="#c44e52", lw=1.5, label=f"{bounds}: {lo:.3g} .. {hi:.3g}")
    ax.axvline(hi, color="#c44e52", lw=1.5)
    clipped = float(((v < lo) | (v > hi)).float().mean()) * 100 if outside is None else outside
    ax.set(title=title or f"{n_levels} levels",
           xlabel=f"value ({n_levels} levels; {clipped:.2f}% outside their bounds)",
           ylabel="count")
    ax.legend(fontsize=7, loc="upper right")
    return ax


def _widest_channel(lo: torch.Tensor, hi: torch.Tensor, values: torch.Tensor) -> tuple[float, float, str,
                                                                                       float]:
    """Bounds to draw for one quantizer: its own (per tensor) or those of its widest channel (per channel, dim
    0 of ``values``); and the share (%) of ``values`` outside their own channel's bounds."""
    lo, hi, v = lo.detach().float().flatten(), hi.detach().float().flatten(), values.detach().float()
    if hi.numel() == 1:
        return (
            float(lo),
            float(hi),
            "clip bounds (per tensor)",
            float(((v < lo) | (v > hi)).float().mean()) * 100,
        )
    shape = (-1,) + (1,) * (v.dim() - 1)
    outside = float(((v < lo.view(shape)) | (v > hi.view(shape))).float().mean()) * 100
    c = int((hi - lo).argmax())
    whose = f"widest of {hi.numel()} channels (#{c}); narrowest ±{float((hi - lo).min()) / 2:.3g}"
    return float(lo[c]), float(hi[c]), whose, outside


def plot_layer_histograms(qnet: nn.Module, weight_layer: str, act_layer: str, batch: torch.Tensor):
    """Weights of ``weight_layer`` and the input of activation quantizer ``act_layer`` (one batch), with
    their clip bounds (a per-channel quantizer: its widest channel's, so every weight is inside) and grids."""
    modules = dict(qnet.named_modules())
    conv, act = modules[weight_layer], modules[act_layer]
    captured = {}
    hook = act.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].detach()))
    was_training = qnet.training
    try:
        with torch.no_grad():
            qnet.eval()(batch)
    finally:
        hook.remove()
        qnet.train(was_training)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    lo_w, hi_w, whose_w, out_w = _widest_channel(*conv.get_clip_w(), conv.weight)
    plot_quantized_histogram(conv.weight, lo_w, hi_w, conv.n_levels, f"{weight_layer} weights", axes[0],
                             whose_w, out_w)
    lo_a, hi_a, whose_a, out_a = _widest_channel(*act.get_clip(), captured["x"])
    plot_quantized_histogram(captured["x"], lo_a, hi_a, act.n_levels, f"{act_layer} input ({len(batch)} "
                                                                      "images)",
                             axes[1], whose_a, out_a)
    return Plot(fig, f"histograms: {weight_layer} weights, {act_layer} input, with their clip bounds")


class LiveClipPlot:
    """Training callback for notebooks: clip bounds redrawn in place after the first batch, after every epoch
    and within an epoch at most every ``max(interval, d / budget)`` seconds, ``d`` the last redraw's duration
    (so that mid-epoch redraws take at most ``budget`` of the training time). Axes show from the start; with
    ``run`` (a run folder being continued) a line says how many epochs it holds, and its epochs so far are
    drawn with the first new batch."""

    def __init__(self, title: str = "", interval: float = 3.0, run=None, budget: float = 0.05):
        if not 0 < budget <= 1:
            raise ValueError(f"LiveClipPlot: budget {budget!r} is not a fraction of the training time in "
                             "(0, 1]")
        self.title, self.interval, self.budget = title, interval, budget
        self.next_at = 0.0  # perf_counter time from which a batch may redraw
        self.points = [r for r in (read_history(run) if run else []) if "quant" in r]
        self.fig = plt.figure(figsize=(15, 4.2), layout="constrained")
        plt.close(self.fig)  # shown through the display handle only, never by the inline backend
        self.handle = DisplayHandle()
        if self.points:  # a finished run trains nothing: a line, not a second copy of the history plot
            self.handle.display({"text/plain": f"{title}: {run} holds {len(self.points)} epochs; the live "
                                               "plot starts with the next training batch (the history is "
                                               "plotted below)"},
                                raw=True)
            return
        for ax in self.fig.subplots(1, 2):
            ax.set(xlabel="epoch", title="waiting for the first batch")
            _epoch_axis(ax)
        self.handle.display(Plot(self.fig, f"{title}: live clip bounds (waiting for the first batch)"))

    def on_batch(self, record: dict) -> None:
        started = time.perf_counter()  # the bounds' summary below counts as drawing time too
        if started >= self.next_at:
            x = record["epoch"] + (record["batch"] + 1) / record["batches"]
            self._add({"epoch": record["epoch"], "x": x, "quant": record["quant"]()},
                      f"epoch {record['epoch'] + 1}, batch {record['batch'] + 1}/{record['batches']}, "
                      f"train loss {record['train']['loss']:.3f}", started)

    def __call__(self, record: dict) -> None:
        if "quant" in record:
            self._add(record, f"epoch {record['epoch'] + 1} done, valid top-1 {record['valid']['top1']:.2f}%")

    def _add(self, point: dict, where: str, started: float | None = None) -> None:
        """Draw with ``point`` added; ``started``: when the work for it began (default now)."""
        started = time.perf_counter() if started is None else started
        self.points.append(point)
        plot = plot_clip_trajectories(self.points, title=f"{self.title}: {where}", fig=self.fig)
        self.handle.update(plot)
        done = time.perf_counter()
        self.next_at = done + max(self.interval, (done - started) / self.budget)


def plot_sensitivity(sensitivity, floor: float = 1e-4, fig=None):
    """Heat maps, layers x bits, of a :class:`labkit.precision.sensitivity.Sensitivity`: the calibration-loss
    increase with only that layer's weights (left) or that activation group (right) quantized; log colours,
    values below ``floor`` (also negative ones) drawn at ``floor``. Returns the figure."""
    parts = [("weights", sensitivity.weights), ("activations", sensitivity.activations)]
    rows = max(len(p) for _, p in parts)
    if fig is None:
        fig = plt.figure(figsize=(11, 1.6 + 0.15 * rows), layout="constrained")
    fig.clear()
    axes = fig.subplots(1, 2)
    bits = list(sensitivity.bits)
    top = max([floor * 10] + [v for _, part in parts for by_bits in part.values() for v in by_bits.values()])
    norm = LogNorm(vmin=floor, vmax=top)
    for ax, (title, part) in zip(axes, parts):
        names = list(part)
        values = np.array([[max(part[n][b], floor) for b in bits] for n in names]).reshape(len(names),
                                                                                           len(bits))
        image = ax.imshow(values, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(bits)), [f"{b}" for b in bits])
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set(xlabel="bits", title=f"{title}: loss increase")
    fig.colorbar(image, ax=list(axes), label="calibration-loss increase (nats/image)")
    fig.suptitle(f"per-layer sensitivity, {sensitivity.n_calib} calibration images, L0 = "
                 f"{sensitivity.base_loss:.4f}")
    return fig


#: marker and colour per kind of point in :func:`plot_pareto`
PARETO_STYLE = {"uniform": ("o", "#4c72b0"), "proposed": ("*", "#c44e52"), "mixed": ("s", "#55a868")}


def plot_pareto(points, x: str = "weight_bytes", ax=None):
    """Top-1 against a cost total (``weight_bytes``, ``act_bytes`` or ``BOPs``) of measured plans: rows of
    :func:`labkit.precision.pareto.collect_points` (mean over seeds, bars from the worst to the best seed, a
    tick per seed), the front of plans no other beats in both, and FP32 runs as a dashed line. Returns the
    figure."""
    rows = list(getattr(points, "rows", points))
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    quantized = [r for r in rows if r["kind"] != "fp32" and r.get(x) is not None]
    for kind, (marker, colour) in PARETO_STYLE.items():
        mine = [r for r in quantized if r["kind"] == kind]
        if not mine:
            continue
        xs, ys = [r[x] for r in mine], [r["top1"] for r in mine]
        spread = [[r["top1"] - r["top1_min"] for r in mine], [r["top1_max"] - r["top1"] for r in mine]]
        ax.errorbar(xs, ys, yerr=spread, fmt=marker, color=colour, ms=11 if marker == "*" else 7, capsize=3,
                    label=kind)
        seeds = [(r[x], t) for r in mine if r.get("n", 1) > 1 for t in r.get("top1s", ())]
        if seeds:  # every seed's run, beside its plan's mean
            ax.scatter(*zip(*seeds), s=12, color=colour, alpha=0.45, marker="_", linewidths=1.5, zorder=3)
        for r in mine:
            ax.annotate(textwrap.fill(f"{r['label']} (n={r['n']})", 34), (r[x], r["top1"]),
                        textcoords="offset points",
                        xytext=(6, 4), fontsize=7)
    front = pareto_front(quantized, x)
    if len(front) > 1:
        ax.step([r[x] for r in front], [r["top1"] for r in front], where="post", color="0.5", lw=1, ls=":",
                label="front")
    for r in (r for r in rows if r["kind"] == "fp32"):
        ax.axhline(r["top1"], color="0.3", ls="--", lw=1, label=f"FP32 {r['top1']:.2f}% (n={r['n']})")
    ax.set(xlabel=f"{x} ({'per sample' if x == 'act_bytes' else 'total'})", ylabel="valid top-1 (%)",
           title=f"accuracy vs {x}")
    ax.grid(alpha=0.3)
    ax.margins(x=0.3, y=0.15)  # room for the labels, which start at their points
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no trained runs yet: train plans (labkit sweep) to place them here", ha="center",
                va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    return ax.figure


def pareto_front(rows: list[dict], x: str) -> list[dict]:
    """Rows that no other row beats with at most their cost and a higher top-1, by increasing cost."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r[x], -r["top1"])):
        if r["top1"] > best:
            front.append(r)
            best = r["top1"]
    return front
