"""Figures of the pruning-by-reservoir and noisy-DPO studies (matplotlib, Agg backend).

Plain numbers in, a figure out; nothing reads the run store.
"""

from __future__ import annotations

import numpy as np

from lmech.plotting import plt

PRUNE_STYLE = {"reservoir": ("tab:blue", "o"), "reservoir_grad": ("tab:cyan", "s"),
               "magnitude": ("tab:red", "^"), "displacement": ("tab:orange", "v"), "random": ("gray", "x")}


def prune_figure(seed_results: list[dict], sparsities: list[float]):
    """Test accuracy before fine-tuning vs sparsity, one panel per task: median over seeds, range bars.

    ``seed_results``: one ``{task: run_task(...) result}`` per seed.
    """
    tasks = list(seed_results[0])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        dense = np.median([r[task]["dense_test_acc"] for r in seed_results])
        ax.axhline(dense, color="k", lw=1, ls=":", label=f"dense {dense:.3f}")
        for method, (color, marker) in PRUNE_STYLE.items():
            vals = np.array([[r[task]["acc"][f"{method}@{s:g}"] for s in sparsities] for r in seed_results])
            med = np.median(vals, axis=0)
            ax.errorbar(sparsities, med, yerr=[med - vals.min(0), vals.max(0) - med], color=color, marker=marker,
                        capsize=3, label=method)
        ax.set(xlabel="sparsity (per layer, weights only)", ylabel="test accuracy, no fine-tuning",
               title=f"{task} ({len(seed_results)} seeds: median, range)", ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


DPO_STYLE = {"adamw": ("tab:red", "o"), "poprisk": ("tab:blue", "s")}


def dpo_figure(rows: list[dict], noises: list[float]):
    """Left: win rate against the reference policy vs swapped fraction; middle: clean held-out reward
    accuracy; right: mean |implicit reward| (drift from the reference). Median over seeds, range bars.

    ``rows``: one dict per (arm, noise, seed) with ``arm``, ``noise``, ``win_rate``, ``clean_reward_acc``
    and ``implicit_reward_abs`` (the selected learning rate's run).
    """
    keys = [("win_rate", "win rate vs reference (true reward)"),
            ("clean_reward_acc", "reward accuracy on clean held-out pairs"),
            ("implicit_reward_abs", "mean |beta log pi/pi_ref| (drift)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, keys):
        for arm, (color, marker) in DPO_STYLE.items():
            med, lo, hi = [], [], []
            for q in noises:
                v = np.array([r[key] for r in rows if r["arm"] == arm and r["noise"] == q])
                med.append(np.median(v) if len(v) else np.nan)
                lo.append(v.min() if len(v) else np.nan)
                hi.append(v.max() if len(v) else np.nan)
            med, lo, hi = map(np.array, (med, lo, hi))
            ax.errorbar(np.array(noises) + (0.004 if arm == "poprisk" else -0.004), med, yerr=[med - lo, hi - med],
                        color=color, marker=marker, capsize=3, label=arm)
        if key == "win_rate":
            ax.axhline(0.5, color="k", lw=1, ls=":")
        ax.set(xlabel="fraction of preference pairs swapped", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
