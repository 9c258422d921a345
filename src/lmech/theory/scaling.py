r"""Fitting the Chinchilla scaling law :math:`L(N, D) = E + A/N^\alpha + B/D^\beta`, done right.

Sources: Hoffmann et al., *Training Compute-Optimal Large Language Models* (2022), Approach 3;
Besiroglu, Erdil, Barnett & You, *Chinchilla Scaling: A replication attempt* (2024), whose
lessons are followed here (shared/research/learning-mechanics.md section 3.2).

Objective
---------
With :math:`A = e^a`, :math:`B = e^b`, :math:`E = e^e`, the model in log space is
:math:`\log\hat L_i = \mathrm{LSE}(a - \alpha\log N_i,\; b - \beta\log D_i,\; e)` (log-sum-exp),
and the fit minimizes the **sum** (not the mean: averaging shrinks the objective and stops
L-BFGS early, Besiroglu et al.) of Huber losses of the log residuals

.. math::  J(a, b, e, \alpha, \beta) = \sum_i \mathrm{Huber}_\delta\big(\log\hat L_i - \log L_i\big),
           \qquad \mathrm{Huber}_\delta(r) = \begin{cases} r^2/2 & |r|\le\delta \\
           \delta(|r| - \delta/2) & |r| > \delta\end{cases}

with :math:`\delta = 10^{-3}` by default. The gradient is analytic (softmax weights of the LSE).

Optimizer. L-BFGS-B (``scipy.optimize.minimize``) from a grid of starts. Hoffmann's grid
(:math:`\alpha,\beta \in \{0, 0.5, \dots, 2\}`, :math:`e \in \{-1, -0.5, \dots, 1\}`,
:math:`a, b \in \{0, 5, \dots, 25\}`: 4,500 points) is evaluated in one vectorized pass and
L-BFGS is run from the ``n_starts`` best grid points (default 16); the best local optimum wins.
*Decision:* one L-BFGS run costs about 100 objective evaluations, so starting from all 4,500
points would cost minutes per fit (and the bootstrap thousands of fits); ranking the grid first
keeps the global character of the grid search at a fraction of the cost. The unit tests check
that the best-k strategy reaches the same optimum as starting from every point of a small grid.
Exponents are kept in :math:`[0, 5]` by box constraints (negative exponents make the law
non-identifiable).

Uncertainty. Nonparametric bootstrap over the data points (resample with replacement, refit);
each refit starts from the full-data optimum, plus the ``bootstrap_starts`` best grid points of
the resampled data if asked (default 0: the resampled optimum is close to the full-data one).
Percentile intervals at ``level`` (95%) are reported; the intervals, not the point values, are
the result (Hoffmann's intervals were implausibly narrow). Note on BLAS: scipy's L-BFGS-B calls
BLAS for tiny vectors; with a multi-threaded OpenBLAS on a busy machine that is many times slower, so
callers should limit BLAS threads (``threadpoolctl.threadpool_limits(1)``), as the catalog does.

Example:
    >>> import numpy as np
    >>> N, D = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6))
    >>> true = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    >>> L = chinchilla_loss(N, D, **true)
    >>> fit = fit_scaling_law(N.ravel(), D.ravel(), L.ravel())
    >>> round(fit.alpha, 3), round(fit.beta, 3), round(fit.E, 3)
    (0.34, 0.28, 1.69)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

__all__ = [
    "PARAMS",
    "HOFFMANN_GRID",
    "chinchilla_loss",
    "huber",
    "objective",
    "ScalingFit",
    "fit_scaling_law",
    "bootstrap_scaling_law",
    "compute_optimal",
]

PARAMS = ("E", "A", "B", "alpha", "beta")

HOFFMANN_GRID = {
    "a": np.arange(0.0, 25.01, 5.0),
    "b": np.arange(0.0, 25.01, 5.0),
    "e": np.arange(-1.0, 1.01, 0.5),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}
"""Hoffmann et al.'s initialization grid for (a, b, e, alpha, beta): 6 x 6 x 5 x 5 x 5 = 4,500 points."""

_BOUNDS = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]


def chinchilla_loss(n, d, E: float, A: float, B: float, alpha: float, beta: float):
    r""":math:`L(N, D) = E + A/N^\alpha + B/D^\beta`."""
    n = np.asarray(n, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    return E + A / n ** alpha + B / d ** beta


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    r""":math:`\mathrm{Huber}_\delta(r)`: quadratic for :math:`|r|\le\delta`, linear beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lse_and_weights(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log-sum-exp of the three terms and its softmax weights (shape (3, m)), overflow-safe."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    ex = np.exp(terms - top)
    total = ex.sum(axis=0)
    return top + np.log(total), ex / total


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
              delta: float = 1e-3) -> tuple[float, np.ndarray]:
    r"""The summed Huber objective :math:`J(\theta)` and its gradient, :math:`\theta = (a, b, e, \alpha, \beta)`."""
    pred, w = _lse_and_weights(theta, log_n, log_d)  # w = d LSE / d term
    r = pred - log_l
    dhub = np.clip(r, -delta, delta)  # Huber'(r)
    g = np.array([
        np.sum(dhub * w[0]),
        np.sum(dhub * w[1]),
        np.sum(dhub * w[2]),
        np.sum(dhub * w[0] * -log_n),
        np.sum(dhub * w[1] * -log_d),
    ])
    return float(np.sum(huber(r, delta))), g


def _grid_values(log_n, log_d, log_l, delta, grid) -> tuple[np.ndarray, np.ndarray]:
    points = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    a, b, e, al, be = (points[:, i:i + 1] for i in range(5))
    terms = np.stack([a - al * log_n[None, :], b - be * log_d[None, :], np.broadcast_to(e, (len(points), len(log_n)))])
    r = logsumexp(terms, axis=0) - log_l[None, :]
    return points, huber(r, delta).sum(axis=1)


@dataclass
class ScalingFit:
    """A fitted law. ``theta`` = (a, b, e, alpha, beta); ``objective`` its summed Huber loss;
    ``ci`` maps each of ``PARAMS`` to its (low, high) bootstrap interval when computed;
    ``samples`` holds the bootstrap fits (rows of E, A, B, alpha, beta)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    theta: np.ndarray
    n_points: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ci_level: float | None = None
    samples: np.ndarray | None = None

    def params(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARAMS}

    def predict(self, n, d):
        return chinchilla_loss(n, d, self.E, self.A, self.B, self.alpha, self.beta)

    def contains(self, name: str, value: float) -> bool:
        lo, hi = self.ci[name]
        return bool(lo <= value <= hi)


def _theta_to_fit(theta: np.ndarray, obj: float, n_points: int) -> ScalingFit:
    a, b, e, alpha, beta = theta
    return ScalingFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                      beta=float(beta), objective=obj, theta=np.array(theta, dtype=np.float64), n_points=n_points)


def _fit_logs(log_n, log_d, log_l, delta, starts) -> tuple[np.ndarray, float]:
    best_theta, best_obj = None, np.inf
    for start in starts:
        res = minimize(objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if res.fun < best_obj:
            best_theta, best_obj = res.x, float(res.fun)
    return best_theta, best_obj


def _validate(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.asarray(n, dtype=np.float64).ravel()
    d = np.asarray(d, dtype=np.float64).ravel()
    loss = np.asarray(loss, dtype=np.float64).ravel()
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"N, D and L must have the same length, got {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < 5:
        raise ValueError(f"need at least 5 points to fit 5 parameters, got {len(n)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("N, D and L must be positive and finite (the fit is in log space)")
    return np.log(n), np.log(d), np.log(loss)


def fit_scaling_law(n, d, loss, delta: float = 1e-3, n_starts: int = 16,
                    grid: dict[str, np.ndarray] | None = None) -> ScalingFit:
    """Fit :math:`E + A/N^\\alpha + B/D^\\beta` (objective and optimizer in the module docstring)."""
    log_n, log_d, log_l = _validate(n, d, loss)
    points, values = _grid_values(log_n, log_d, log_l, delta, grid or HOFFMANN_GRID)
    starts = points[np.argsort(values)[:n_starts]]
    theta, obj = _fit_logs(log_n, log_d, log_l, delta, starts)
    return _theta_to_fit(theta, obj, len(log_n))


def bootstrap_scaling_law(n, d, loss, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                          delta: float = 1e-3, n_starts: int = 16, bootstrap_starts: int = 0,
                          grid: dict[str, np.ndarray] | None = None) -> ScalingFit:
    """Point fit plus nonparametric-bootstrap percentile intervals at ``level`` for every parameter."""
    log_n, log_d, log_l = _validate(n, d, loss)
    fit = fit_scaling_law(n, d, loss, delta=delta, n_starts=n_starts, grid=grid)
    rng = np.random.default_rng(seed)
    m = len(log_n)
    samples = np.empty((n_boot, 5))
    use_grid = grid or HOFFMANN_GRID
    for i in range(n_boot):
        idx = rng.integers(0, m, size=m)
        starts = [fit.theta]
        if bootstrap_starts > 0:
            points, values = _grid_values(log_n[idx], log_d[idx], log_l[idx], delta, use_grid)
            starts += list(points[np.argsort(values)[:bootstrap_starts]])
        theta, obj = _fit_logs(log_n[idx], log_d[idx], log_l[idx], delta, starts)
        boot = _theta_to_fit(theta, obj, m)
        samples[i] = [boot.E, boot.A, boot.B, boot.alpha, boot.beta]
    tail = 100.0 * (1.0 - level) / 2.0
    fit.ci = {name: (float(np.percentile(samples[:, j], tail)), float(np.percentile(samples[:, j], 100.0 - tail)))
              for j, name in enumerate(PARAMS)}
    fit.ci_level = level
    fit.samples = samples
    return fit


def compute_optimal(c, A: float, B: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    r"""Compute-optimal :math:`(N, D)` under :math:`C = 6ND`:
    :math:`N_{opt} = G (C/6)^{\beta/(\alpha+\beta)}`, :math:`D_{opt} = G^{-1}(C/6)^{\alpha/(\alpha+\beta)}`,
    :math:`G = (\alpha A/(\beta B))^{1/(\alpha+\beta)}`."""
    c = np.asarray(c, dtype=np.float64)
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return g * (c / 6.0) ** (beta / (alpha + beta)), (c / 6.0) ** (alpha / (alpha + beta)) / g
