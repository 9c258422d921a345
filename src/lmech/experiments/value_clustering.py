r"""Tokens cluster by the value matrix's geometry: the attention-particles entry beyond
:math:`V = I` (Geshkovski, Letrouit, Polyanskiy & Rigollet, *The emergence of clusters in
self-attention dynamics*, NeurIPS 2023).

Dynamics and closed-form consequences: :mod:`lmech.theory.value_clustering` (unnormalized
tokens in :math:`\mathbb R^d`, :math:`Q = K = I`, inverse temperature ``beta``, rescaled tokens
:math:`z = e^{-tV}x` integrated by RK4 with step ``dt`` to ``t_max``; ``n_tokens`` Gaussian
tokens). Three value matrices, symmetric with eigenvalues

1. ``V = I`` in :math:`d = 2`: every :math:`z_i` converges to a vertex of a convex polygon.
   Checks: the number of distinct limit points (groups closer than ``point_tol``) equals the number
   of vertices of their convex hull; and :math:`\max_i\lVert z_i(t) - z_i(T)\rVert` decays at rate
   1 (= :math:`\lambda`; slope of its logarithm over ``t`` in [3, 10], within 5%).
2. simple top eigenvalue, ``simple_spectrum`` (default 1, 0.5, 0.25, in a random eigenbasis),
   :math:`d = 3`: the normalized tokens :math:`x_i/\lVert x_i\rVert` converge to the two points
   :math:`\pm\varphi_1`. Checks: at most 2 distinct limit directions, each within ``point_tol``
   of :math:`\pm\varphi_1`; :math:`\sin\angle(x_i, \pm\varphi_1)` decays at rate
   :math:`\lambda_1-\lambda_2` (median over tokens of the slope over ``t`` in [T/2, T], within 5%); and the first eigen-coordinates
   :math:`\langle z_i, \varphi_1\rangle` take at most 3 values (three parallel hyperplanes; the
   full :math:`z_i` need not cluster, and do not: reported).
3. top eigenvalue with multiplicity 2, ``degenerate_spectrum`` (1, 1, 0.3): the normalized tokens
   converge onto the great circle of the top eigenspace, and inside it the projected :math:`z_i`
   behave as for :math:`V = I`. Checks: the distance to the eigenspace decays at rate
   :math:`\lambda_1 - \lambda_3` (within 5%); distinct projected limit points = convex-hull
   vertices.

Tolerances: 5% on the rates (the slopes include the transient before attention is hard; measured
0.02%, 0.6% and 2.8% while choosing the windows); ``point_tol`` 1e-3 for limit sets (the distances
at ``t_max`` are 1e-4 to 1e-5). Results: docs/results/verify.md. ``quick``: 16 tokens (at ``t_max`` 12 the
alignment rate of the slowest token read over [6, 12] was still 22% off, at 16 7% off: tokens whose
leader is still being decided; hence the median over tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmech.core.threads import blas_threads
from lmech.experiments._laws import parse_list
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.theory import value_clustering as vc

RATE_TOLERANCE = 0.05


@dataclass
class ValueClusteringConfig:
    n_tokens: int = 32                       # tokens per simulation
    beta: float = 1.0                        # inverse temperature
    t_max: float = 16.0                      # integration time
    dt: float = 0.01                         # RK4 step
    simple_spectrum: str = "1,0.5,0.25"      # eigenvalues of V, simple positive top one
    degenerate_spectrum: str = "1,1,0.3"     # eigenvalues of V, top one with multiplicity 2
    point_tol: float = 1e-3                  # distance below which limit points are the same

    def validate(self) -> None:
        require(self.n_tokens >= 4, f"n_tokens must be >= 4, got {self.n_tokens}")
        require(self.beta > 0 and self.dt > 0, "beta and dt must be positive")
        require(self.t_max >= 14, f"t_max must be >= 14 (the alignment rate is read over [T/2, T], after the transient), got {self.t_max}")
        simple = parse_list(self.simple_spectrum, float, "simple_spectrum")
        degen = parse_list(self.degenerate_spectrum, float, "degenerate_spectrum")
        s = sorted(simple, reverse=True)
        require(len(s) >= 2 and s[0] > 0 and s[0] > s[1], "simple_spectrum needs a simple, positive top eigenvalue")
        g = sorted(degen, reverse=True)
        require(len(g) >= 3 and g[0] > 0 and g[0] == g[1] > g[2],
                "degenerate_spectrum needs a positive top eigenvalue of multiplicity exactly 2, e.g. 1,1,0.3")
        require(0 < self.point_tol < 0.1, "point_tol must be in (0, 0.1)")


def run(cfg: ValueClusteringConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: ValueClusteringConfig, run, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    T, tol = cfg.t_max, cfg.point_tol
    result: dict = {"n_tokens": cfg.n_tokens, "t_max": T}
    series = {}

    # 1. V = I in the plane: limit points are the vertices of their convex hull
    sim = vc.simulate_rescaled(rng.standard_normal((cfg.n_tokens, 2)), cfg.beta, np.eye(2), T, cfg.dt)
    limits = vc.group_points(sim.z[-1], tol)
    dist = np.linalg.norm(sim.z - sim.z[-1], axis=-1).max(axis=1)
    result.update({"identity.limit_points": len(limits), "identity.hull_vertices": vc.hull_vertex_count(limits),
                   "identity.rate": vc.decay_rate(sim.t, dist, 3.0, 10.0), "identity.rate_predicted": -1.0})
    series["identity"] = (sim, dist)

    # 2. simple top eigenvalue: directions -> +-phi_1, first coordinates on <= 3 hyperplanes
    lam = sorted(parse_list(cfg.simple_spectrum, float), reverse=True)
    v, phi = vc.symmetric_value_matrix(lam, seed=seed)
    sim = vc.simulate_rescaled(rng.standard_normal((cfg.n_tokens, len(lam))), cfg.beta, v, T, cfg.dt)
    p1 = phi[:, 0]
    sin_i = np.sqrt(np.clip(1.0 - (sim.u @ p1) ** 2, 0.0, None))        # (m, n)
    sin = sin_i.max(axis=1)
    directions = vc.group_points(sim.u[-1], tol)
    result.update({
        "simple.directions": len(directions),
        "simple.max_sin_to_phi1": float(sin[-1]),
        "simple.rate": vc.median_decay_rate(sim.t, sin_i, T / 2, T), "simple.rate_predicted": -(lam[0] - lam[1]),
        "simple.hyperplanes": len(vc.group_points((sim.z[-1] @ p1)[:, None], tol)),
        "simple.limit_points": len(vc.group_points(sim.z[-1], tol)),
        "simple.positive_fraction": float(np.mean(sim.u[-1] @ p1 > 0)),
    })
    series["simple"] = (sim, sin, p1)

    # 3. top eigenvalue of multiplicity 2: onto the eigenspace's circle; a polygon inside it
    lam3 = sorted(parse_list(cfg.degenerate_spectrum, float), reverse=True)
    v3, phi3 = vc.symmetric_value_matrix(lam3, seed=seed + 1)
    sim = vc.simulate_rescaled(rng.standard_normal((cfg.n_tokens, len(lam3))), cfg.beta, v3, T, cfg.dt)
    top = phi3[:, :2]
    off_i = np.linalg.norm(sim.u - (sim.u @ top) @ top.T, axis=-1)     # (m, n)
    off = off_i.max(axis=1)
    proj = vc.group_points(sim.z[-1] @ top, tol)
    result.update({
        "degenerate.max_distance_to_eigenspace": float(off[-1]),
        "degenerate.rate": vc.median_decay_rate(sim.t, off_i, T / 2, T), "degenerate.rate_predicted": -(lam3[0] - lam3[2]),
        "degenerate.limit_points": len(proj), "degenerate.hull_vertices": vc.hull_vertex_count(proj),
    })
    series["degenerate"] = (sim, off, top)
    for k, t in enumerate(series["identity"][0].t):
        run.log(k, t=float(t), identity_distance=float(series["identity"][1][k]),
                simple_max_sin=float(series["simple"][1][k]), degenerate_offset=float(series["degenerate"][1][k]))
    _save_figure(run, series, result)
    return result


def check(result: dict) -> list[CheckRow]:
    def rate_row(quantity, key):
        pred, meas = result[f"{key}.rate_predicted"], result[f"{key}.rate"]
        return CheckRow.relative(quantity, pred, meas if np.isfinite(meas) else float("nan"), RATE_TOLERANCE)

    limit, hull = result["identity.limit_points"], result["identity.hull_vertices"]
    dlimit, dhull = result["degenerate.limit_points"], result["degenerate.hull_vertices"]
    return [
        CheckRow("V = I: limit points that are convex-hull vertices", limit, hull, "exact", limit == hull),
        rate_row("V = I: convergence rate of z (d log|z - z_T| / dt)", "identity"),
        CheckRow.at_most("simple top eigenvalue: distinct limit directions of x/|x| (+-phi_1)", 2,
                         result["simple.directions"]),
        CheckRow.at_most("simple top eigenvalue: max sin angle(x_i, +-phi_1) at T", 1e-3,
                         result["simple.max_sin_to_phi1"]),
        rate_row("simple top eigenvalue: rate of alignment (-(lambda_1 - lambda_2))", "simple"),
        CheckRow.at_most("simple top eigenvalue: hyperplanes <z_i, phi_1> = const", 3, result["simple.hyperplanes"]),
        rate_row("multiplicity 2: rate onto the top eigenspace (-(lambda_1 - lambda_3))", "degenerate"),
        CheckRow("multiplicity 2: projected limit points that are hull vertices", dlimit, dhull, "exact",
                 dlimit == dhull),
    ]


def _save_figure(run, series: dict, result: dict) -> None:
    from lmech.plotting import plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    sim, _ = series["identity"]
    ax = axes[0]
    for i in range(sim.z.shape[1]):
        ax.plot(sim.z[:, i, 0], sim.z[:, i, 1], color="0.6", lw=0.7)
    ax.scatter(sim.z[0, :, 0], sim.z[0, :, 1], s=10, color="C0", label="z(0)")
    ax.scatter(sim.z[-1, :, 0], sim.z[-1, :, 1], s=60, marker="*", color="C3", label="z(T): hull vertices")
    ax.set(title=f"V = I: {result['identity.limit_points']} leaders", xlabel="z_1", ylabel="z_2")
    ax.legend(fontsize=8)
    ax = axes[1]
    sim, sin, p1 = series["simple"]
    c1 = sim.z @ p1
    for i in range(c1.shape[1]):
        ax.plot(sim.t, c1[:, i], color="C0", lw=0.7)
    ax.set(title=f"simple lambda_1: <z_i, phi_1> -> {result['simple.hyperplanes']} values", xlabel="t")
    ax = axes[2]
    for key, label, color in (("identity", "V=I: max |z - z_T|", "C0"), ("simple", "simple: max sin(x, +-phi_1)", "C1"),
                              ("degenerate", "mult. 2: max dist to eigenspace", "C2")):
        t, y = series[key][0].t, series[key][1]
        ax.semilogy(t, y, color=color, label=label)
        rate = result[f"{key}.rate_predicted"]
        k = len(t) // 2
        ax.semilogy(t, y[k] * np.exp(rate * (t - t[k])), "k--", lw=0.8)
    ax.set(xlabel="t", title="rates: measured vs predicted (dashed)", ylim=(1e-9, 10))
    ax.legend(fontsize=7)
    ax = axes[3]
    sim, _, top = series["degenerate"]
    pz = sim.z @ top
    for i in range(pz.shape[1]):
        ax.plot(pz[:, i, 0], pz[:, i, 1], color="0.6", lw=0.7)
    ax.scatter(pz[-1, :, 0], pz[-1, :, 1], s=60, marker="*", color="C3")
    ax.set(title=f"multiplicity 2: {result['degenerate.limit_points']} leaders in the eigenspace")
    fig.tight_layout()
    run.save_figure(fig, "value-clustering")


EXPERIMENT = Experiment(
    name="value-clustering",
    summary="self-attention with a value matrix V: tokens go to hull vertices (V=I), +-top eigenvector, or the top eigenspace",
    config=ValueClusteringConfig,
    run=run,
    check=check,
    quick={"n_tokens": 16},
)
