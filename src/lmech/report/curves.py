"""Metric curves: group a run's logged scalars into panels, draw them, and compare a sweep's runs.

Used by ``lmech report`` (matplotlib figures) and by ``lmech lab`` (the same panel grouping, sent
as JSON to the page). matplotlib with the non-interactive Agg backend.

Panel rules (:func:`metric_panels`). The *main* panels, in this order:

1. **accuracy**: ``acc``, ``accuracy`` and ``<split>_acc``; or **error**: ``error`` and
   ``<split>_error``, with ``<split>`` one of train, test, val, valid, heldout, query, eval (the
   lab plots error rates ``1 - acc``, made by :func:`with_errors`; ``lin_error`` is not an error
   rate and is not drawn here);
2. **loss**: names containing ``loss`` or ``risk`` (the population-risk estimate belongs beside the
   held-out loss it predicts);
3. **signal channel / reservoir**: the four cells ``signal_channel``, ``signal_reservoir``,
   ``noise_channel``, ``noise_reservoir`` (energies of the clean and the label-noise part of the
   residual in each subspace; :mod:`lmech.experiments.label_noise`);
4. **reservoir fraction**: ``*_reservoir_fraction`` and ``*_channel_fraction``;
5. **energy**: any other name containing ``energy`` (e.g. the attention-particle energies).

Then every other scalar, grouped by its first ``_``-separated word (``weight_norm`` -> ``weight``),
in alphabetical order (``Panel.main`` is False for these).

Axis rules: the step axis is logarithmic when the logged steps span at least three decades (the
grokking convention, Power et al. 2022: a long plateau then a late jump); a panel's y axis is
logarithmic when all its values are positive and span at least two decades (losses).

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"step": [0, 10], "train_acc": [0.1, 0.9], "test_loss": [2.0, 1.0], "lr": [1e-3, 1e-3]})
    >>> [(p.title, p.series, p.main) for p in metric_panels(df)]
    [('accuracy', ('train_acc',), True), ('loss', ('test_loss',), True), ('lr', ('lr',), False)]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SPLITS = "train|test|val|valid|validation|heldout|held_out|query|eval"
_ACCURACY = re.compile(rf"(({SPLITS})_)?(acc|accuracy)")
_ERROR = re.compile(rf"(({SPLITS})_)?error")
_CELL = re.compile(r"(signal|noise)_(channel|reservoir)")
_FRACTION = re.compile(r".+_(channel|reservoir)_fraction")
MAIN_PANELS = ("accuracy", "error", "loss", "signal channel / reservoir", "reservoir fraction", "energy")
LOG_X_DECADES = 3.0
LOG_Y_DECADES = 2.0


@dataclass(frozen=True)
class Panel:
    """One subplot: a title, the metric columns drawn in it, whether its y axis is log, and whether
    it is one of the main panels (accuracy or error, loss, the signal/reservoir cells and fractions)."""

    title: str
    series: tuple[str, ...]
    logy: bool = False
    main: bool = False

    def as_dict(self) -> dict:
        return {"title": self.title, "series": list(self.series), "logy": self.logy, "main": self.main}


def _main_panel(name: str) -> str | None:
    if _ACCURACY.fullmatch(name):
        return "accuracy"
    if _ERROR.fullmatch(name):
        return "error"
    if "loss" in name or "risk" in name:
        return "loss"
    if _CELL.fullmatch(name):
        return "signal channel / reservoir"
    if _FRACTION.fullmatch(name):
        return "reservoir fraction"
    if "energy" in name:
        return "energy"
    return None


def with_errors(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of a wide metrics frame with every accuracy column ``x_acc`` replaced by
    ``x_error = 1 - x_acc`` (``acc`` -> ``error``): the error rates the lab plots."""
    out = df.copy()
    for col in [c for c in df.columns if c != "step" and (c == "acc" or c.endswith("_acc"))]:
        name = "error" if col == "acc" else col[: -len("acc")] + "error"
        if name not in out.columns:
            out.insert(out.columns.get_loc(col), name, 1.0 - out[col])
            out = out.drop(columns=col)
    return out


def _log_worthy(values: np.ndarray, decades: float) -> bool:
    values = values[np.isfinite(values)]
    if values.size < 2 or (values <= 0).any():
        return False
    return math.log10(values.max() / values.min()) >= decades


def metric_panels(df: pd.DataFrame, columns: Iterable[str] | None = None) -> list[Panel]:
    """Group the metric columns of a wide frame (one row per step) into panels (module docstring)."""
    names = [c for c in (columns if columns is not None else df.columns) if c != "step"]
    main: dict[str, list[str]] = {}
    rest: dict[str, list[str]] = {}
    for name in names:
        title = _main_panel(name)
        if title is not None:
            main.setdefault(title, []).append(name)
        else:
            rest.setdefault(name.split("_")[0] or name, []).append(name)
    panels = []
    for title, series in [*((t, main[t]) for t in MAIN_PANELS if t in main), *sorted(rest.items())]:
        values = np.concatenate([pd.to_numeric(df[s], errors="coerce").to_numpy(float) for s in series]) \
            if all(s in df.columns for s in series) else np.array([])
        panels.append(Panel(title, tuple(series), _log_worthy(values, LOG_Y_DECADES), title in main))
    return panels


def log_steps(steps: Sequence[float]) -> bool:
    """True when the positive logged steps span at least ``LOG_X_DECADES`` decades."""
    return _log_worthy(np.asarray(steps, dtype=float)[np.asarray(steps, dtype=float) > 0], LOG_X_DECADES)


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.6, 3.3)):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def curves_figure(df: pd.DataFrame, title: str = "", panels: list[Panel] | None = None, ncols: int = 3,
                  max_panels: int = 30):
    """Logged scalars of one run against step, one subplot per panel of :func:`metric_panels`.

    ``df`` is a wide metrics frame (``Run.metrics(wide=True)``); ``panels`` defaults to all of its
    panels (at most ``max_panels``, the first in panel order). Returns a matplotlib figure, or
    ``None`` when there is nothing to draw.
    """
    if df is None or df.empty or len(df.columns) <= 1:
        return None
    panels = (panels if panels is not None else metric_panels(df))[:max_panels]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=ncols, size=(4.6, 3.3) if ncols <= 3 else (3.8, 2.9))
    logx = log_steps(df["step"])
    for ax, panel in zip(axes, panels):
        for name in panel.series:
            sub = df[["step", name]].dropna()
            if logx:
                sub = sub[sub["step"] > 0]
            ax.plot(sub["step"], sub[name], label=name, lw=1.4)
        ax.set(title=panel.title, xlabel="step", xscale="log" if logx else "linear",
               yscale="log" if panel.logy else "linear")
        if panel.title == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(panel.series) > 4 else 8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- sweeps ----------------------------------------------------------------------------------------
def _numeric_axis(values: Sequence) -> tuple[bool, bool]:
    """(numeric, log): a grid key's values are plotted on a numeric axis when they all parse as
    numbers, and on a log axis when they are also positive and span at least a factor 10."""
    try:
        nums = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        return False, False
    if isinstance(values[0], bool) or not np.isfinite(nums).all():
        return False, False
    return True, bool((nums > 0).all() and nums.max() / nums.min() >= 10)


def _ordered_groups(frame: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """``frame`` grouped by ``keys``, in ascending order of the key values (numbers by value, other
    values by their text), so a figure's lines and legend do not depend on the order in which runs
    happened to be loaded."""
    if not keys:
        return [((), frame)]

    def order(item):
        combo = item[0] if isinstance(item[0], tuple) else (item[0],)
        return tuple(_sort_key(v) for v in combo)

    groups = sorted(frame.groupby(keys, sort=False, dropna=False), key=order)
    return [(combo if isinstance(combo, tuple) else (combo,), part) for combo, part in groups]


def _sort_key(value) -> tuple:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return (1, 0.0, str(value))
    return (0, number, "") if np.isfinite(number) else (1, 0.0, str(value))


def _spread_stats(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    return (frame.groupby(by, sort=False, dropna=False)[metric]
            .agg(median="median", lo="min", hi="max", n="count").reset_index())


def sweep_result_figure(summary: pd.DataFrame, grid_keys: list[str], metric: str, max_lines: int = 8):
    """One sweep result against each grid key: the median over seeds (line), the spread over seeds
    (min to max band) and every seed (dots). With several grid keys, one line per combination of
    the other keys (at most ``max_lines``). ``summary`` is :func:`lmech.sweeps.summary`'s frame.

    Only finished runs (done or diverged) count. A run without a value for ``metric`` (e.g. a
    ``step_to_95`` of None: it never got there) is left out of the median, and the point is marked
    ``k/n``: k of the n finished runs there have a value (``0/n`` at the bottom of the axes where
    none has). Every plot of a sweep has the same x values, those of its finished runs; a log axis
    when they are positive numbers spanning a factor 10 or more, ticks at the grid values.
    """
    finished = summary[summary["state"].isin(["done", "diverged"])].copy()
    finished[metric] = pd.to_numeric(finished[metric], errors="coerce")
    keys = [k for k in grid_keys if k in finished.columns]
    if finished[metric].notna().sum() == 0 or not keys:
        return None
    fig, axes = _grid(len(keys), ncols=min(3, len(keys)), size=(5.0, 3.6))
    for ax, key in zip(axes, keys):
        others = [k for k in keys if k != key]
        values = list(dict.fromkeys(finished[key].tolist()))
        numeric, logx = _numeric_axis(values)
        if numeric:
            values = sorted(values, key=float)
        position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
        for n_line, (combo, part) in enumerate(_ordered_groups(finished, others)):
            if n_line >= max_lines:
                break
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or metric
            stats = _spread_stats(part, [key], metric)  # n counts the runs with a value
            stats["total"] = stats[key].map(part[key].value_counts())
            stats["x"] = stats[key].map(position)
            stats = stats.sort_values("x")
            line, = ax.plot(stats["x"], stats["median"], marker="o", label=label)
            color = line.get_color()
            ax.fill_between(stats["x"], stats["lo"], stats["hi"], color=color, alpha=0.18, lw=0)
            ax.scatter(part[key].map(position), part[metric], s=9, color=color, alpha=0.45)
            for row in stats.itertuples(index=False):
                if row.n == 0:
                    ax.annotate(f"0/{row.total}", (row.x, 0.03), xycoords=("data", "axes fraction"), fontsize=8,
                                color=color, ha="center")
                elif row.n < row.total:
                    ax.annotate(f"{row.n}/{row.total}", (row.x, row.median), textcoords="offset points",
                                xytext=(4, 4), fontsize=8, color=color)
        ax.set(xlabel=key, ylabel=metric, xscale="log" if logx else "linear", title=f"{metric} vs {key}")
        ax.set_xticks(list(position.values()), [_tick(v) for v in position])
        ax.set_xlim(*_padded(list(position.values()), logx))
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _padded(xs: list[float], log: bool, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around ``xs`` with ``pad`` of the span on each side (in log space on a log axis)."""
    lo, hi = min(xs), max(xs)
    if log:
        ratio = (hi / lo) ** pad
        return lo / ratio, hi * ratio
    span = (hi - lo) or 1.0
    return lo - pad * span * (1 if hi > lo else 6), hi + pad * span * (1 if hi > lo else 6)


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_curves_figure(metrics: pd.DataFrame, summary: pd.DataFrame, grid_keys: list[str], metric: str,
                        max_lines: int = 8):
    """One logged metric against step for every grid point: the median over seeds and the min-max
    band. ``metrics`` is ``lmech.runs.load(sweep=..., wide=True)``; runs are matched to their grid
    point through ``run_id``.
    """
    if metrics.empty or metric not in metrics.columns:
        return None
    keys = [k for k in grid_keys if k in summary.columns]
    points = summary[["run_id", *keys]]
    data = metrics[["run_id", "step", metric]].dropna().merge(points, on="run_id")
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    logx = log_steps(data["step"])
    for n_line, (combo, part) in enumerate(_ordered_groups(data, keys)):
        if n_line >= max_lines:
            break
        stats = _spread_stats(part, ["step"], metric).sort_values("step")
        if logx:
            stats = stats[stats["step"] > 0]
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, combo)) or metric
        line, = ax.plot(stats["step"], stats["median"], label=f"{label} (n={int(stats['n'].max())})")
        ax.fill_between(stats["step"], stats["lo"], stats["hi"], color=line.get_color(), alpha=0.18, lw=0)
    values = data[metric].to_numpy(float)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric}: median and min-max over seeds",
           xscale="log" if logx else "linear", yscale="log" if _log_worthy(values, LOG_Y_DECADES) else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["Panel", "curves_figure", "log_steps", "metric_panels", "sweep_curves_figure", "sweep_result_figure",
           "with_errors"]
