r"""Self-attention dynamics in :math:`\mathbb R^d` with a general value matrix: where tokens go
depends on the spectrum of :math:`V` (Geshkovski, Letrouit, Polyanskiy & Rigollet, *The emergence
of clusters in self-attention dynamics*, NeurIPS 2023, arXiv 2305.05465).

The flow (no normalization, fixed weights, :math:`n` tokens :math:`x_i \in \mathbb R^d`):

.. math::  \dot x_i = \sum_j P_{ij}(t)\, V x_j, \qquad
           P_{ij} = \frac{e^{\beta\langle Qx_i, Kx_j\rangle}}{\sum_k e^{\beta\langle Qx_i, Kx_k\rangle}}.

Tokens grow like :math:`e^{tV}`, so the paper studies the rescaled tokens
:math:`z_i(t) = e^{-tV}x_i(t)`. Since :math:`V` commutes with :math:`e^{tV}`,

.. math::  \dot z_i = V\Big(\sum_j P_{ij}(t)\, z_j - z_i\Big), \qquad
           P_{ij} = \operatorname{softmax}_j\big(\beta\langle Q e^{tV}z_i, K e^{tV}z_j\rangle\big),

which is what :func:`simulate_rescaled` integrates (RK4; no overflow, as :math:`z` stays bounded).
The paper's results that this module's entry checks (``value-clustering``), for
:math:`Q^\top K` positive definite:

* :math:`V = I_d`: every :math:`z_i(t)` converges to a vertex of a convex polytope (the limit
  points are the extreme points of their own convex hull: "leaders");
* :math:`V` with a simple, positive top eigenvalue :math:`\lambda_1` (eigenvector
  :math:`\varphi_1`): the coordinates :math:`\langle z_i(t), \varphi_1\rangle` converge to at most
  three values (tokens on at most three parallel hyperplanes);
* the top eigenvalue with multiplicity: polytope behaviour inside the top eigenspace.

Consequences computed here in closed form (derived for symmetric :math:`V = \sum_k \lambda_k
\varphi_k\varphi_k^\top`, the case the entry simulates): once the :math:`z_i` have converged,
:math:`x_i(t) = \sum_k e^{\lambda_k t}\langle z_i,\varphi_k\rangle\varphi_k`, so the normalized
tokens :math:`x_i/\lVert x_i\rVert` converge to :math:`\pm\varphi_1` (simple top eigenvalue) or to
the unit sphere of the top eigenspace (multiplicity), and the distance to that limit set decays
like :math:`e^{-(\lambda_1 - \lambda_{\rm next})t}`, :math:`\lambda_{\rm next}` the largest
eigenvalue below :math:`\lambda_1`. Near the limit attention is hard (each token attends to its
leader), so :math:`z_i - z_i(\infty)` decays like :math:`e^{-\lambda t}` in an eigendirection of
eigenvalue :math:`\lambda`, like :math:`e^{-t}` for :math:`V = I`.

Example:
    >>> import numpy as np
    >>> z0 = np.random.default_rng(0).standard_normal((8, 2))
    >>> sim = simulate_rescaled(z0, beta=1.0, v=np.eye(2), t_max=8.0, dt=0.02)
    >>> sim.z.shape, bool(np.abs(sim.z[-1] - sim.z[-2]).max() < 1e-2)
    ((81, 8, 2), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull

__all__ = ["symmetric_value_matrix", "rescaled_field", "RescaledSimulation", "simulate_rescaled",
           "group_points", "hull_vertex_count", "decay_rate", "median_decay_rate"]


def symmetric_value_matrix(eigenvalues, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(V, phi)``: :math:`V = \\Phi\\,\\mathrm{diag}(\\lambda)\\,\\Phi^\\top` with a random orthogonal
    :math:`\\Phi` (columns ``phi[:, k]`` the eigenvectors, in the order of ``eigenvalues``)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    phi, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return (phi * lam) @ phi.T, phi


def rescaled_field(z: np.ndarray, t: float, beta: float, lam: np.ndarray, phi: np.ndarray,
                   qk: np.ndarray | None = None) -> np.ndarray:
    r""":math:`\dot z_i = V(\sum_j P_{ij} z_j - z_i)` (module docstring) for symmetric
    :math:`V = \Phi\,\mathrm{diag}(\lambda)\,\Phi^\top`; ``qk`` is :math:`Q^\top K` (identity if
    ``None``). ``z`` is ``(n, d)``. Softmax with the row maximum subtracted."""
    grow = np.exp(t * lam)                               # e^{t V} in the eigenbasis
    x = ((z @ phi) * grow) @ phi.T                       # (n, d): x = e^{tV} z
    logits = beta * (x @ x.T if qk is None else x @ qk @ x.T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    diff = p @ z - z
    return ((diff @ phi) * lam) @ phi.T


@dataclass
class RescaledSimulation:
    """Times ``t`` (m,), rescaled tokens ``z`` (m, n, d), and the directions ``u`` (m, n, d) of
    the original tokens :math:`x = e^{tV}z` (unit vectors, computed without forming :math:`x`)."""

    t: np.ndarray
    z: np.ndarray
    u: np.ndarray


def simulate_rescaled(z0: np.ndarray, beta: float, v: np.ndarray, t_max: float, dt: float = 0.01,
                      record_every: int = 10, qk: np.ndarray | None = None) -> RescaledSimulation:
    """Integrate the rescaled flow from ``z0`` (= ``x(0)``) with RK4, step ``dt``, to ``t_max``.

    ``v`` must be symmetric (its eigendecomposition gives :math:`e^{tV}`)."""
    v = np.asarray(v, dtype=np.float64)
    if not np.allclose(v, v.T):
        raise ValueError("v must be symmetric")
    lam, phi = np.linalg.eigh(v)
    z = np.asarray(z0, dtype=np.float64).copy()
    steps = int(np.ceil(t_max / dt))
    ts, zs, us = [], [], []

    def direction(zk: np.ndarray, t: float) -> np.ndarray:
        c = zk @ phi                                     # eigen-coordinates of z
        log_scale = t * lam                              # x-coordinates c_k e^{lam_k t}, rescaled by the max
        w = c * np.exp(log_scale - log_scale.max())
        u = w @ phi.T
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    for step in range(steps + 1):
        t = step * dt
        if step % record_every == 0 or step == steps:
            ts.append(t)
            zs.append(z.copy())
            us.append(direction(z, t))
        if step == steps:
            break
        k1 = rescaled_field(z, t, beta, lam, phi, qk)
        k2 = rescaled_field(z + 0.5 * dt * k1, t + 0.5 * dt, beta, lam, phi, qk)
        k3 = rescaled_field(z + 0.5 * dt * k2, t + 0.5 * dt, beta, lam, phi, qk)
        k4 = rescaled_field(z + dt * k3, t + dt, beta, lam, phi, qk)
        z = z + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return RescaledSimulation(np.array(ts), np.array(zs), np.array(us))


def group_points(points: np.ndarray, tol: float) -> np.ndarray:
    """Representatives of the groups of ``points`` (m, k) closer than ``tol`` (single linkage)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    pts = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    dist = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=-1)
    n, labels = connected_components(csr_matrix(dist < tol), directed=False)
    return np.array([pts[labels == c].mean(axis=0) for c in range(n)])


def hull_vertex_count(points: np.ndarray) -> int:
    """Number of vertices of the convex hull of ``points`` (k >= 2 dims; all points if fewer than
    k + 1 or degenerate)."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) <= pts.shape[1]:
        return len(pts)
    try:
        return len(ConvexHull(pts).vertices)
    except Exception:  # degenerate (collinear) sets: the extreme points along the line
        return 2


def decay_rate(t: np.ndarray, y: np.ndarray, t_from: float, t_to: float) -> float:
    """Least-squares slope of ``log y`` against ``t`` over ``[t_from, t_to]`` (negative: decay)."""
    t, y = np.asarray(t), np.asarray(y)
    sel = (t >= t_from) & (t <= t_to) & (y > 0)
    if sel.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[sel], np.log(y[sel]), 1)[0])


def median_decay_rate(t: np.ndarray, y: np.ndarray, t_from: float, t_to: float) -> float:
    """Median over tokens of :func:`decay_rate` of each column of ``y`` (m, n): robust to the few
    tokens whose leader is still being decided at ``t_from``."""
    rates = [decay_rate(t, y[:, i], t_from, t_to) for i in range(y.shape[1])]
    rates = [r for r in rates if np.isfinite(r)]
    return float(np.median(rates)) if rates else float("nan")
