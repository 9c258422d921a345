"""The grokking entry's figure (matplotlib, Agg backend: :mod:`lmech.plotting`); nothing reads the run store."""

from __future__ import annotations

import pandas as pd

from lmech.plotting import plt


def grokking_figure(df: pd.DataFrame, title: str = "", marks: dict[str, int | None] | None = None):
    """Classic grokking curves: accuracy and loss (train vs held-out) and weight norm against step.

    ``df`` is a wide metrics frame (one row per evaluated step) with columns train_acc, test_acc,
    train_loss, test_loss and weight_norm. The step axis is logarithmic, as in Power et al. (2022),
    so the long memorization plateau and the late jump are both visible.
    """
    df = df[df["step"] > 0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(df["step"], df["train_acc"], label="train", color="tab:blue")
    ax.plot(df["step"], df["test_acc"], label="held-out", color="tab:red")
    for label, step in (marks or {}).items():
        if step:
            ax.axvline(step, color="gray", ls=":", lw=1)
            ax.text(step, 0.02, f" {label} @ {step}", rotation=90, va="bottom", fontsize=8, color="gray")
    ax.set(xscale="log", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title="accuracy")
    ax.legend(loc="center left")
    ax = axes[1]
    ax.plot(df["step"], df["train_loss"], label="train", color="tab:blue")
    ax.plot(df["step"], df["test_loss"], label="held-out", color="tab:red")
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="cross-entropy", title="loss")
    ax.legend()
    ax = axes[2]
    ax.plot(df["step"], df["weight_norm"], color="tab:green")
    ax.set(xscale="log", xlabel="step", ylabel="||w||_2", title="weight norm")
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
