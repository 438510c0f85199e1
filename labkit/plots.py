"""matplotlib figures drawn from a run's history records (never from trainer state)."""

from __future__ import annotations


def plot_training_curves(history: list[dict], title: str = "", axes=None):
    """Loss (left) and top-1 (right) per epoch, train and valid. Returns the figure."""
    import matplotlib.pyplot as plt

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
