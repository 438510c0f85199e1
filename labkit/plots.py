"""matplotlib figures drawn from run histories and networks (they read; they never train or mutate)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
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
