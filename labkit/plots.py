"""matplotlib figures drawn from run histories and networks (they read; they never train or mutate)."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm
from IPython.display import display
from torch import nn


def plot_training_curves(history: list[dict], title: str = "", axes=None):
    """Loss (left) and top-1 (right) per epoch, train and valid. Returns the figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    else:
        fig = axes[0].figure
        for ax in axes:
            ax.clear()
    epochs = [r["epoch"] + 1 for r in history]
    for split, style in (("train", "--"), ("valid", "-")):
        axes[0].plot(epochs, [r[split]["loss"] for r in history], style, marker="o", label=split)
        axes[1].plot(epochs, [r[split]["top1"] for r in history], style, marker="o", label=split)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _layer_groups(history: list[dict]) -> dict[str, list[str]]:
    """Quantizer names of the last record by ``kind``: ``{"activations": [...], "weights": [...]}``."""
    quant = history[-1].get("quant", {}) if history else {}
    return {kind: [n for n, s in quant.items() if s.get("kind", "activations") == kind]
            for kind in ("activations", "weights")}


def plot_clip_trajectories(history: list[dict], layers: list[str] | None = None, title: str = "", fig=None):
    """Clipping bounds per quantized layer over epochs: activation ``hi`` (alpha), weight ``hi`` (mean over
    channels), and ``log2 t`` when the run is TQT. One line per layer, coloured by depth."""
    groups = _layer_groups(history)
    if layers is not None:
        groups = {k: [n for n in v if n in layers] for k, v in groups.items()}
    tqt = any("log2_t" in s for r in history for s in r.get("quant", {}).values())
    panels = [("activations", "hi"), ("weights", "hi")] + ([("activations", "log2_t")] if tqt else [])
    if fig is None:
        fig = plt.figure(figsize=(5 * len(panels), 3.8))
    fig.clear()
    axes = fig.subplots(1, len(panels))
    cmap = plt.get_cmap("viridis")
    for ax, (group, key) in zip(axes, panels):
        names = groups[group]
        for i, name in enumerate(names):
            points = [(r["epoch"] + 1, r["quant"][name].get(key)) for r in history if name in r.get("quant", {})]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), color=cmap(i / max(1, len(names) - 1)), lw=1, marker=".")
        ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=f"{group}: {key.replace('_', ' ')} per layer")
        ax.grid(alpha=0.3)
    if groups["activations"] or groups["weights"]:
        sm = plt.cm.ScalarMappable(cmap=cmap)
        fig.colorbar(sm, ax=list(axes), label="depth (input -> output)", ticks=[])
    if title:
        fig.suptitle(title)
    return fig


def plot_quantized_histogram(values: torch.Tensor, lo: float, hi: float, n_levels: int, title: str = "", ax=None):
    """Histogram of ``values`` with the clip bounds and, for <= 64 levels, the grid ``lo + k eps``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    v = values.detach().flatten().float().cpu()
    span = max(hi - lo, 1e-12)
    ax.hist(v.numpy(), bins=120, range=(min(float(v.min()), lo - 0.1 * span), max(float(v.max()), hi + 0.1 * span)),
            color="#4c72b0", alpha=0.8, log=True)
    if n_levels <= 64:
        eps = (hi - lo) / (n_levels - 1)
        for k in range(n_levels):
            ax.axvline(lo + k * eps, color="0.6", lw=0.4)
    for bound in (lo, hi):
        ax.axvline(bound, color="#c44e52", lw=1.5)
    clipped = float(((v < lo) | (v > hi)).float().mean()) * 100
    ax.set(title=title or f"{n_levels} levels, clipped {clipped:.2f}%", xlabel="value", ylabel="count")
    return ax


def plot_layer_histograms(qnet: nn.Module, weight_layer: str, act_layer: str, batch: torch.Tensor):
    """Weights of ``weight_layer`` and the input of activation quantizer ``act_layer`` (one batch), with
    their clip bounds and grids. Returns the figure."""
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    lo_w, hi_w = (float(t.float().mean()) for t in conv.get_clip_w())
    plot_quantized_histogram(conv.weight, lo_w, hi_w, conv.n_levels, f"{weight_layer} weights", axes[0])
    lo_a, hi_a = (float(t.float().mean()) for t in act.get_clip())
    plot_quantized_histogram(captured["x"], lo_a, hi_a, act.n_levels, f"{act_layer} input", axes[1])
    fig.tight_layout()
    return fig


class LiveClipPlot:
    """Training callback for notebooks: redraws clip trajectories and curves after every epoch in place."""

    def __init__(self, title: str = ""):
        self.title, self.history = title, []
        self.fig = plt.figure(figsize=(15, 3.8))
        plt.close(self.fig)  # shown through the display handle only
        self.handle = display(self.fig, display_id=True)

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if "quant" in record:
            plot_clip_trajectories(self.history, title=f"{self.title} (epoch {record['epoch'] + 1})", fig=self.fig)
            self.handle.update(self.fig)


def plot_sensitivity(sensitivity, floor: float = 1e-4, fig=None):
    """Heat maps, layers x bits, of a :class:`labkit.sensitivity.Sensitivity`: the calibration-loss increase with
    only that layer's weights (left) or that activation group (right) quantized; log colours, values below
    ``floor`` (also negative ones) drawn at ``floor``. Returns the figure."""
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
        values = np.array([[max(part[n][b], floor) for b in bits] for n in names]).reshape(len(names), len(bits))
        image = ax.imshow(values, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(bits)), [f"{b}" for b in bits])
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set(xlabel="bits", title=f"{title}: loss increase")
    fig.colorbar(image, ax=list(axes), label="calibration-loss increase (nats/image)")
    fig.suptitle(f"per-layer sensitivity, {sensitivity.n_calib} calibration images, L0 = {sensitivity.base_loss:.4f}")
    return fig


#: marker and colour per kind of point in :func:`plot_pareto`
PARETO_STYLE = {"uniform": ("o", "#4c72b0"), "proposed": ("*", "#c44e52"), "mixed": ("s", "#55a868")}


def plot_pareto(points, x: str = "weight_bytes", ax=None):
    """Top-1 against a cost total (``weight_bytes``, ``act_bytes`` or ``BOPs``) of measured plans: rows of
    :func:`labkit.pareto.collect_points` (mean over seeds, bars from the worst to the best seed), the front of
    plans no other beats in both, and FP32 runs as a dashed line. Returns the figure."""
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
        for r in mine:
            ax.annotate(textwrap.fill(f"{r['label']} (n={r['n']})", 34), (r[x], r["top1"]), textcoords="offset points",
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
    ax.legend(fontsize=8, loc="best")
    return ax.figure


def pareto_front(rows: list[dict], x: str) -> list[dict]:
    """Rows that no other row beats with at most their cost and a higher top-1, by increasing cost."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r[x], -r["top1"])):
        if r["top1"] > best:
            front.append(r)
            best = r["top1"]
    return front
