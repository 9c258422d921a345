"""Figures of the signal-channel / reservoir experiments (matplotlib, Agg backend).

Each function takes plain numbers (lists of per-readout dicts, numpy arrays) assembled by the
experiment and returns a matplotlib figure; none reads the run store.
"""

from __future__ import annotations

import numpy as np

from lmech.plotting import plt

CELL_COLORS = {"signal_channel": "tab:blue", "signal_reservoir": "lightsteelblue",
               "noise_channel": "tab:red", "noise_reservoir": "mistyrose"}


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key, np.nan) for r in rows], dtype=float)


def _scatter(ax, pred, actual, title):
    lo, hi = float(min(pred.min(), actual.min())), float(max(pred.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls=":")
    ax.scatter(actual, pred, s=6, alpha=0.6)
    corr = np.corrcoef(pred, actual)[0, 1] if np.std(pred) > 0 and np.std(actual) > 0 else np.nan
    rel = np.linalg.norm(pred - actual) / max(np.linalg.norm(actual), 1e-300)
    ax.set(xlabel="actual", ylabel="predicted", title=f"{title}\ncorr {corr:.4f}, rel. err {rel:.3g}")


def coupling_figure(data: dict):
    """Rich arm: predicted vs actual test displacement, kernel drift and coupling over time, W_S
    spectra over time, invisibility; lazy arm: W_S eigenvalues vs the frozen-kernel formula and
    A dU_S vs kernel regression."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    rich, lazy = data.get("rich"), data.get("lazy")
    if rich:
        _scatter(axes[0, 0], rich["pred"], rich["actual"], "rich: A dU_S vs dU_Q (query outputs)")
        rows = rich["rows"]
        steps = _col(rows, "step")
        ax = axes[0, 1]
        ax.plot(steps, _col(rows, "drift_op"), label="||K_t - K_0|| / ||K_0||", color="tab:purple")
        ax.plot(steps, _col(rows, "kernel_norm_ratio"), label="||K_t|| / ||K_0||", color="tab:orange")
        ax.set(xlabel="step", ylabel="kernel drift", title="rich: kernel drift and coupling")
        ax.legend(loc="upper left", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(steps, 1 - _col(rows, "coupling_corr"), color="tab:green", label="1 - corr(A dU_S, dU_Q)")
        ax2.set_yscale("log")
        ax2.set_ylabel("1 - coupling corr", color="tab:green")
        ax = axes[0, 2]
        for step, ev, cut in rich["spectra"]:
            pos = ev[ev > 0]
            ax.plot(np.arange(1, len(pos) + 1), pos, label=f"step {step}")
        ax.axhline(rich["spectra"][-1][2], color="k", ls="--", lw=1, label="cut (n/2)(1-e^-2)")
        ax.set(xscale="log", yscale="log", xlabel="index j", ylabel="omega_j", title="rich: W_S spectrum over time")
        ax.legend(fontsize=7)
        ax = axes[1, 0]
        r = rich["ratios"]
        ok = r > 0
        ax.loglog(r[ok], rich["g_psi"][ok], ".", ms=4, label="||G psi_j|| / ||G||")
        ax.loglog(r[ok], np.sqrt(r[ok]), color="gray", ls=":", label="sqrt(omega_j / omega_max)")
        ax.axvline(rich["null_tol"], color="tab:red", ls="--", lw=1, label="near-null threshold")
        ax.axhline(1e-3, color="tab:red", ls=":", lw=1, label="1e-3")
        ax.set(xlabel="omega_j / omega_max", ylabel="||G_Q psi_j|| / ||G_Q||", title="rich: reservoir invisibility")
        ax.legend(fontsize=7)
    if lazy:
        ax = axes[1, 1]
        m = lazy["mask"]
        ax.loglog(lazy["predicted"][m], lazy["measured"][m], ".", ms=5)
        lo, hi = lazy["predicted"][m].min(), lazy["predicted"][m].max()
        ax.plot([lo, hi], [lo, hi], color="gray", ls=":")
        ax.axhline((lazy["n"] / 2) * (1 - np.exp(-2)), color="k", ls="--", lw=1, label="cut")
        ax.set(xlabel="(n/2)(1 - exp(-2 lambda T / n))", ylabel="measured omega_j",
               title=f"lazy: W_S vs frozen-kernel formula (T = {lazy['time']:.3g})")
        ax.legend(fontsize=8)
        _scatter(axes[1, 2], lazy["pred_A"], lazy["pred_K"], "lazy: G D^+ dU_S vs K_QS K_SS^+ dU_S")
        axes[1, 2].set(xlabel="kernel regression", ylabel="A dU_S")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.set_visible(False)
    fig.tight_layout()
    return fig


def label_noise_figure(rows: list[dict], split, projections: dict, title: str = ""):
    """One label-noise run: the four cells over training, errors and the noise reservoir fraction,
    the population-risk estimate against the held-out loss, and the final W_S spectrum with the
    clean and noise energy per eigendirection."""
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    steps = _col(rows, "step")
    ax = axes[0]
    for cell, color in CELL_COLORS.items():
        if cell in rows[0]:
            ax.plot(steps, _col(rows, cell), color=color, lw=2, label=cell.replace("_", " "))
    ax.set(xlabel="step", ylabel="energy per example", title="four cells: {signal, noise} x {channel, reservoir}")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(steps, _col(rows, "test_error"), color="tab:red", label="test error (clean labels)")
    ax.plot(steps, _col(rows, "train_error"), color="tab:blue", label="train error (noisy labels)")
    if "noise_reservoir_fraction" in rows[0]:
        ax.plot(steps, _col(rows, "noise_reservoir_fraction"), color="tab:red", ls="--",
                label="noise: reservoir fraction")
    ax.plot(steps, _col(rows, "clean_reservoir_fraction"), color="tab:blue", ls="--", label="signal: reservoir fraction")
    ax.set(xlabel="step", ylim=(-0.02, 1.02), title="errors and reservoir fractions")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, _col(rows, "heldout_noisy_loss"), color="k", label="held-out loss (noisy labels, never seen)")
    ax.plot(steps, _col(rows, "poprisk_loo"), color="tab:green", label="path-leverage LOO estimate")
    ax.plot(steps, _col(rows, "poprisk_gcv"), color="tab:olive", label="path GCV estimate")
    ax.plot(steps, _col(rows, "poprisk_ustat"), color="tab:gray", ls=":", label="U-statistic reconstruction")
    ax.plot(steps, _col(rows, "loss"), color="tab:blue", label="train loss")
    ax.set(xlabel="step", ylabel="1/2 mean squared error", title="validation-free population-risk estimate")
    ax.legend(fontsize=7)
    ax = axes[3]
    ev = split.eigenvalues
    idx = np.arange(1, len(ev) + 1)
    ax.loglog(idx[ev > 0], ev[ev > 0], color="k", label="omega_j (W_S)")
    ax.axhline(split.cutoff, color="k", ls="--", lw=1, label="cut")
    ax2 = ax.twinx()
    for part, color in (("clean", "tab:blue"), ("noise", "tab:red")):
        c2 = np.cumsum(projections.get(part, np.zeros(1)))
        if c2[-1] > 0:
            ax2.plot(idx, c2 / c2[-1], color=color, label=f"{part}: cumulative energy")
    ax.set(xlabel="eigen-direction j (descending omega)", title=f"final W_S spectrum ({split.n_channel} in channel)")
    ax.legend(fontsize=7, loc="lower left")
    if ax2.has_data():
        ax2.set_ylabel("cumulative energy fraction")
        ax2.legend(fontsize=7, loc="center left")
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def noise_table_figure(df, curves: dict):
    """Across noise levels q: test error and noise reservoir fraction vs q; test error against the
    channel noise energy over training (one curve per q); the population-risk estimate against the
    held-out loss over training."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(df["noise"], df["final_test_error"], "o-", color="tab:red", label="final test error")
    ax.plot(df["noise"], df["min_test_error"], "o:", color="tab:red", label="best test error during training")
    if "noise_reservoir_fraction_final" in df:
        ax.plot(df["noise"], df["noise_reservoir_fraction_final"], "s-", color="tab:purple",
                label="noise reservoir fraction (final)")
        ax.plot(df["noise"], df["noise_reservoir_fraction_first"], "s:", color="tab:purple",
                label="noise reservoir fraction (first readout)")
    ax.set(xlabel="label noise q", ylim=(-0.02, 1.02), title="test error and where the noise sits")
    ax.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    qs = sorted(curves)
    for i, q in enumerate(qs):
        m = curves[q]
        if "noise_channel" not in m or q == 0:
            continue
        m = m.dropna(subset=["noise_channel", "test_error"])
        axes[1].plot(m["noise_channel"], m["test_error"], "o-", ms=3, color=cmap(i / max(len(qs) - 1, 1)),
                     label=f"q = {q:g}")
        m2 = curves[q].dropna(subset=["heldout_noisy_loss"])
        axes[2].plot(m2["step"], m2["heldout_noisy_loss"], color=cmap(i / max(len(qs) - 1, 1)), label=f"held-out, q={q:g}")
        axes[2].plot(m2["step"], m2["poprisk_loo"], color=cmap(i / max(len(qs) - 1, 1)), ls="--")
    axes[1].set(xlabel="noise energy in the channel (per example)", ylabel="test error",
                title="test error vs channel noise, over training")
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="step", ylabel="1/2 MSE", yscale="log",
                title="held-out loss (solid) vs path-leverage LOO estimate (dashed)")
    axes[2].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def double_descent_figure(table: list[dict], spectra: list, n: int, noise: float):
    """Across widths: test loss / error and training loss; where the label noise sits (reservoir
    fraction, energy on small nonzero omega); the noise-induced test displacement; W_S spectra."""
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    w = _col(table, "width")
    params = _col(table, "params")
    thr = float(np.interp(n, params, w)) if params.min() <= n <= params.max() else None
    ax = axes[0]
    ax.plot(w, _col(table, "test_loss"), "o-", color="tab:red", label="test loss (clean labels)")
    ax.plot(w, _col(table, "loss"), "o-", color="tab:blue", label="train loss (noisy labels)")
    ax.set(xscale="log", xlabel="width", ylabel="1/2 MSE", title=f"double descent (q = {noise:g}, n = {n})")
    ax2 = ax.twinx()
    ax2.plot(w, _col(table, "test_error"), "s:", color="tab:red", label="test error")
    ax2.set_ylabel("test error")
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[1]
    if "noise_reservoir_fraction" in table[0]:
        ax.plot(w, _col(table, "noise_reservoir_fraction"), "o-", color="tab:purple", label="noise: reservoir fraction")
        ax.plot(w, _col(table, "noise_band_fraction"), "o-", color="tab:orange",
                label="noise: fraction on small nonzero omega")
        ax.plot(w, _col(table, "clean_reservoir_fraction"), "o:", color="tab:blue", label="signal: reservoir fraction")
    ax.set(xscale="log", xlabel="width", ylim=(-0.02, 1.02), title="where the label noise sits (end of training)")
    ax.legend(fontsize=8)
    ax = axes[2]
    if "noise_transfer" in table[0]:
        ax.plot(w, _col(table, "noise_transfer"), "o-", color="tab:green", label="||G_Q g_noise||^2 / m")
    ax.plot(w, _col(table, "test_loss"), "o:", color="tab:red", label="test loss")
    ax.set(xscale="log", yscale="log", xlabel="width", title="noise-induced test displacement vs test loss")
    ax.legend(fontsize=8)
    ax = axes[3]
    cmap = plt.get_cmap("viridis")
    for i, (width, ev, cut) in enumerate(spectra):
        pos = ev[ev > 0]
        ax.loglog(np.arange(1, len(pos) + 1), pos, color=cmap(i / max(len(spectra) - 1, 1)), label=f"width {width}")
    ax.axhline(spectra[-1][2], color="k", ls="--", lw=1, label="cut")
    ax.set(xlabel="j", ylabel="omega_j", title="W_S spectrum at the end of training")
    ax.legend(fontsize=6, ncol=2)
    for a in axes:
        a.grid(alpha=0.3)
        if thr is not None and a is not axes[3]:
            a.axvline(thr, color="gray", ls="--", lw=1)
    fig.tight_layout()
    return fig


def grokking_channel_figure(rows: list[dict], windows: list[dict], marks: dict):
    """Accuracy curves with the signal in the window channel, the signal transfer and the kernel
    alignment over training; the window Gramian spectra."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    steps = _col(rows, "step")
    ax = axes[0]
    ax.plot(steps, _col(rows, "train_acc"), color="tab:blue", label="train accuracy")
    ax.plot(steps, _col(rows, "test_acc"), color="tab:red", label="held-out accuracy")
    ax.plot(steps, _col(rows, "signal_channel_fraction"), color="tab:purple", ls="--",
            label="signal in window channel (fraction of ||y||^2)")
    ax.plot(steps, _col(rows, "signal_transfer"), color="tab:green", ls="--", label="signal transfer cos(G_Q y, y_Q)")
    for (label, step), color in zip(marks.items(), ("tab:blue", "tab:purple", "tab:green", "tab:red")):
        if step is not None:
            ax.axvline(step, color=color, lw=1, ls=":")
            ax.text(step, 0.02, f" {label}", rotation=90, fontsize=7, color=color, va="bottom")
    ax.set(xlabel="step", ylim=(-0.05, 1.05), title="grokking and the signal channel")
    ax.legend(fontsize=7, loc="center right")
    ax = axes[1]
    ax.semilogy(steps, _col(rows, "loss"), color="tab:blue", label="train loss")
    ax.semilogy(steps, _col(rows, "test_loss"), color="tab:red", label="held-out loss")
    ax.semilogy(steps, _col(rows, "lin_error"), color="gray", ls=":", label="lin_error (recorder)")
    ax.set(xlabel="step", title="losses")
    ax.legend(fontsize=8)
    ax = axes[2]
    cmap = plt.get_cmap("viridis")
    for i, wdw in enumerate(windows):
        ev = wdw["spectrum"]
        pos = ev[ev > 0]
        ax.loglog(np.arange(1, len(pos) + 1), pos / pos[0], color=cmap(i / max(len(windows) - 1, 1)),
                  label=f"window ending {wdw['step']}" if i % max(len(windows) // 6, 1) == 0 else None)
    ax.set(xlabel="j", ylabel="omega_j / omega_max", title="window Gramian spectra")
    ax.legend(fontsize=6)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig
