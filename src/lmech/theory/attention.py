r"""Tokens as interacting particles: the self-attention flow on the sphere.

Sources: Geshkovski, Letrouit, Polyanskiy & Rigollet, *A mathematical perspective on
Transformers* (2023/24) and *The emergence of clusters in self-attention dynamics* (NeurIPS 2023);
Karagodin, Polyanskiy & Rigollet, *Clustering in causal attention masking* (2024); Rigollet,
*The mean-field dynamics of Transformers* (2025). Notation follows
shared/research/learning-mechanics.md, section "Attention dynamics".

The dynamics
------------
A transformer with attention-only residual layers and layer normalization is, in the limit of
many layers, a flow of the ``n`` tokens :math:`x_i \in S^{d-1}` (LayerNorm keeps them on the
sphere; :math:`P^\perp_x y = y - \langle x, y\rangle x` projects on its tangent space):

.. math::  \text{(SA)}\quad \dot x_i = P^\perp_{x_i}\Big(\sum_{j \in \mathcal N(i)}
           \frac{e^{\beta\langle Qx_i, Kx_j\rangle}}{Z_i}\, V x_j\Big), \qquad
           Z_i = \sum_{k \in \mathcal N(i)} e^{\beta\langle Qx_i, Kx_k\rangle},

with :math:`\mathcal N(i) = \{1..n\}` (full attention) or :math:`\{1..i\}` (causal mask). The
*unnormalized* variant (USA) replaces :math:`1/Z_i` by :math:`1/n`. ``beta`` is the inverse
temperature; :math:`Q = K = V = I` by default.

Energy. :math:`E_\beta = \frac1{2\beta n^2}\sum_{i,j} e^{\beta\langle x_i, x_j\rangle}`. With
:math:`Q=K=V=I` and full attention, USA is gradient ascent of :math:`E_\beta` on the sphere in time
rescaled by ``n`` (:math:`\dot x_i = n\,P^\perp_{x_i}\nabla_{x_i}E_\beta`), and SA rescales each
token's velocity by the positive factor :math:`n/Z_i`, so along both
:math:`\dot E_\beta = \sum_i c_i\lVert P^\perp_{x_i}\nabla_{x_i}E_\beta\rVert^2 \ge 0`:
the energy is non-decreasing. (No such statement holds with the causal mask.)

Clustering. For :math:`d \ge 3` and almost every start, full attention drives all tokens to one
point; for moderate or large :math:`\beta` they first gather in several metastable clusters that
merge after long times. With the causal mask token 1 attends only to itself, so it never moves,
and with :math:`V = I` every token converges to :math:`x_1(0)` (Karagodin et al. 2024).

Equiangular reduction. If :math:`\langle x_i, x_j\rangle = \rho` for all :math:`i \ne j` (possible
for :math:`n \le d`), symmetry keeps the configuration equiangular and (derived here for
:math:`Q=K=V=I`, full attention)

.. math::  \dot\rho = \frac{2 e^{\beta\rho}(1-\rho)(1+(n-1)\rho)}{D}, \qquad
           D = n \text{ (USA)}, \quad D = e^{\beta} + (n-1)e^{\beta\rho} \text{ (SA)},

a one-dimensional prediction that the particle simulation must reproduce
(:func:`equiangular_rho`).

Integrator: classical RK4 in :math:`\mathbb R^{n\times d}` on the projected field, followed by
renormalizing every token to unit norm after each step (the discretized "Post-LN"); the
projection error is :math:`O(dt^5)` per step.

Example:
    >>> import numpy as np
    >>> x0 = random_sphere(16, 3, seed=0)
    >>> sim = simulate(x0, beta=1.0, t_max=30.0, dt=0.05, record_every=100)
    >>> bool(np.all(np.diff(sim.energy) >= 0)), int(sim.clusters[0]), int(sim.clusters[-1])
    (True, 16, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.integrate import solve_ivp
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "random_sphere",
    "attention_field",
    "interaction_energy",
    "count_clusters",
    "Simulation",
    "simulate",
    "equiangular_configuration",
    "equiangular_rho",
]

Model = Literal["SA", "USA"]


def random_sphere(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``n`` points drawn uniformly on the unit sphere :math:`S^{d-1}` (normalized Gaussians)."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def attention_field(x: np.ndarray, beta: float, model: Model = "SA", causal: bool = False,
                    q: np.ndarray | None = None, k: np.ndarray | None = None, v: np.ndarray | None = None,
                    project: bool = True) -> np.ndarray:
    r"""The velocity :math:`\dot x_i` of every token (formula in the module docstring).

    ``x`` is ``(n, d)``; ``q``, ``k``, ``v`` are ``(d, d)`` (identity if ``None``).
    ``project=False`` drops :math:`P^\perp` (the unnormalized :math:`\mathbb R^d` dynamics).
    Softmax weights are computed with the row maximum subtracted (no overflow at large beta).
    """
    n = x.shape[0]
    qx = x if q is None else x @ q.T
    kx = x if k is None else x @ k.T
    vx = x if v is None else x @ v.T
    logits = beta * qx @ kx.T
    if causal:
        logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    if model == "SA":
        logits = logits - logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
    elif model == "USA":
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.exp(logits) / n
    else:
        raise ValueError(f"model must be 'SA' or 'USA', got {model!r}")
    with np.errstate(over="ignore", invalid="ignore"):  # USA overflow is reported by simulate()
        field = w @ vx
        if project:
            field = field - np.sum(field * x, axis=1, keepdims=True) * x
    return field


def interaction_energy(x: np.ndarray, beta: float) -> float:
    r""":math:`E_\beta = \frac1{2\beta n^2}\sum_{i,j} e^{\beta\langle x_i,x_j\rangle}`."""
    n = x.shape[0]
    return float(np.exp(beta * x @ x.T).sum() / (2.0 * beta * n * n))


def count_clusters(x: np.ndarray, threshold: float = 1e-3) -> int:
    r"""Connected components of the graph with an edge when :math:`\langle x_i,x_j\rangle > 1-` ``threshold``."""
    adj = csr_matrix((x @ x.T) > 1.0 - threshold)
    return int(connected_components(adj, directed=False)[0])


@dataclass
class Simulation:
    """A recorded trajectory: times ``t`` (m,), tokens ``x`` (m, n, d), ``energy`` (m,),
    ``clusters`` (m,) and the settings used."""

    t: np.ndarray
    x: np.ndarray
    energy: np.ndarray
    clusters: np.ndarray
    beta: float
    model: str
    causal: bool


def simulate(x0: np.ndarray, beta: float, t_max: float, dt: float = 0.01, model: Model = "SA",
             causal: bool = False, record_every: int = 10, cluster_threshold: float = 1e-3,
             q: np.ndarray | None = None, k: np.ndarray | None = None, v: np.ndarray | None = None,
             record_times: np.ndarray | None = None) -> Simulation:
    """Integrate the attention flow on the sphere with RK4 (step ``dt``) and renormalization.

    Records every ``record_every`` steps, or at the steps nearest to ``record_times`` if given
    (e.g. a log-spaced grid, for staircase plots), always including ``t = 0`` and the end.
    """
    if dt <= 0 or t_max <= 0:
        raise ValueError("dt and t_max must be positive")
    x = np.asarray(x0, dtype=np.float64).copy()
    if x.ndim != 2:
        raise ValueError(f"x0 must be (n, d), got shape {x.shape}")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    steps = int(np.ceil(t_max / dt))
    if record_times is not None:
        marks = set(np.clip(np.round(np.asarray(record_times) / dt).astype(int), 0, steps).tolist())
    else:
        marks = set(range(0, steps + 1, max(1, int(record_every))))
    marks |= {0, steps}

    def f(y: np.ndarray) -> np.ndarray:
        return attention_field(y, beta, model, causal, q, k, v)

    ts, xs, es, cs = [], [], [], []
    for step in range(steps + 1):
        if step in marks:
            ts.append(step * dt)
            xs.append(x.copy())
            es.append(interaction_energy(x, beta))
            cs.append(count_clusters(x, cluster_threshold))
        if step == steps:
            break
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if not np.all(np.isfinite(x)):
            raise FloatingPointError(f"tokens became non-finite at t = {(step + 1) * dt:g}; lower dt "
                                     f"(USA speeds scale like exp(beta) = {np.exp(beta):.3g}: keep dt * exp(beta) < 1)")
    return Simulation(t=np.array(ts), x=np.array(xs), energy=np.array(es), clusters=np.array(cs),
                      beta=float(beta), model=model, causal=bool(causal))


def equiangular_configuration(n: int, d: int, rho: float, seed: int = 0) -> np.ndarray:
    r"""``n`` unit vectors in :math:`\mathbb R^d` with all pairwise inner products ``rho``.

    Needs :math:`n \le d` and :math:`-1/(n-1) < \rho < 1`: the Gram matrix
    :math:`(1-\rho)I + \rho\,\mathbf 1\mathbf 1^\top` is then positive definite; its Cholesky
    factor, rotated by a random orthogonal map, gives the vectors.
    """
    if n > d:
        raise ValueError(f"an equiangular configuration of n={n} vectors with generic rho needs d >= n, got d={d}")
    if not -1.0 / (n - 1) < rho < 1.0:
        raise ValueError(f"rho must be in (-1/(n-1), 1) = ({-1.0 / (n - 1):.4g}, 1), got {rho}")
    gram = (1 - rho) * np.eye(n) + rho * np.ones((n, n))
    chol = np.linalg.cholesky(gram)  # rows are vectors in R^n
    rot, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return chol @ rot[:n, :]


def equiangular_rho(rho0: float, n: int, beta: float, t: np.ndarray, model: Model = "SA") -> np.ndarray:
    r"""Solve the equiangular reduction :math:`\dot\rho = 2e^{\beta\rho}(1-\rho)(1+(n-1)\rho)/D`.

    ``D = n`` for USA and :math:`e^\beta + (n-1)e^{\beta\rho}` for SA (module docstring);
    integrated with ``solve_ivp`` (DOP853, rtol 1e-12) at the times ``t``.
    """
    if model not in ("SA", "USA"):
        raise ValueError(f"model must be 'SA' or 'USA', got {model!r}")

    def rhs(_t: float, r: np.ndarray) -> np.ndarray:
        num = 2.0 * np.exp(beta * r) * (1.0 - r) * (1.0 + (n - 1) * r)
        den = n if model == "USA" else np.exp(beta) + (n - 1) * np.exp(beta * r)
        return num / den

    t = np.asarray(t, dtype=np.float64)
    sol = solve_ivp(rhs, (0.0, float(t[-1])), [rho0], method="DOP853", t_eval=t, rtol=1e-12, atol=1e-14)
    if not sol.success:
        raise RuntimeError(f"equiangular ODE failed: {sol.message}")
    return sol.y[0]
