"""Small helpers shared by the law-catalog entries (deep-linear, saddle-to-saddle, kernel-curves,
scaling-law, attention-particles, quanta): list parsing, threshold crossings, log-log slopes,
and an order check row (one-thread BLAS: :func:`lmech.core.threads.blas_threads`)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lmech.experiments.base import CheckRow
from lmech.errors import ConfigError


def parse_list(text: str, kind: Callable = float, key: str = "value") -> list:
    """``"4,2,1"`` -> ``[4.0, 2.0, 1.0]``; a one-line ConfigError on bad items."""
    try:
        out = [kind(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated {kind.__name__}s like 4,2,1; got {text!r}") from None
    if not out:
        raise ConfigError(f"{key} must list at least one value, got {text!r}")
    return out


def first_crossing(t: np.ndarray, y: np.ndarray, level: float, rising: bool = True) -> float | None:
    """First time ``y`` crosses ``level`` (upwards if ``rising``), linearly interpolated; None if never."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    hit = y >= level if rising else y <= level
    if not hit.any():
        return None
    i = int(np.argmax(hit))
    if i == 0:
        return float(t[0])
    y0, y1 = y[i - 1], y[i]
    return float(t[i - 1] + (level - y0) / (y1 - y0) * (t[i] - t[i - 1]))


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and R^2 of ``log y`` against ``log x``."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    total = np.sum((ly - ly.mean()) ** 2)
    return float(slope), float(1.0 - np.sum(resid ** 2) / total) if total > 0 else 1.0


def order_row(quantity: str, expected: Sequence, measured: Sequence) -> CheckRow:
    """A pass/fail row comparing two orderings exactly (e.g. modes by time of learning)."""
    exp, got = ",".join(map(str, expected)), ",".join(map(str, measured))
    return CheckRow(quantity, exp, got, "exact", exp == got)


def log_series(run, steps: np.ndarray, series: dict[str, np.ndarray], every: int = 1) -> None:
    """Log aligned arrays ``series[name][k]`` at ``steps[k]`` (every ``every``-th point, and the last)."""
    idx = list(range(0, len(steps), max(1, every)))
    if idx[-1] != len(steps) - 1:
        idx.append(len(steps) - 1)
    for k in idx:
        run.log(int(steps[k]), **{name: float(values[k]) for name, values in series.items() if np.isfinite(values[k])})
