r"""Tokens as interacting particles: self-attention dynamics on the sphere cluster, merge, and
(with a causal mask) collapse onto the first token.

Theory and integrator: :mod:`lmech.theory.attention` (Geshkovski, Letrouit, Polyanskiy & Rigollet
2023/24; Karagodin, Polyanskiy & Rigollet 2024; research notes, "Attention dynamics"). Tokens start
uniform on :math:`S^{d-1}` (``dim``); :math:`Q=K=V=I`; layer normalization keeps them on the sphere
(tangent projection plus renormalization after every RK4 step of size ``dt``).

Runs and predictions:

1. **Full attention, SA** (``n_tokens``, ``beta``, to ``t_max``): the interaction energy
   :math:`E_\beta = \frac1{2\beta n^2}\sum_{ij}e^{\beta\langle x_i,x_j\rangle}` never decreases;
   tokens gather quickly into a few metastable clusters (connected components of
   :math:`\langle x_i,x_j\rangle > 1 -` ``cluster_threshold``), clusters only merge, never split, and
   for :math:`d\ge3` they end in a single cluster.
2. **Full attention, USA** (step ``usa_dt``: USA velocities scale like :math:`e^\beta`): the same
   energy is non-decreasing (USA is its gradient ascent, time rescaled by :math:`n`).
3. **Causal mask, SA** (to ``causal_t_max``): token 1 attends only to itself and never moves; every
   token converges to :math:`x_1(0)`.
4. **Equiangular start** (``equi_n`` tokens in ``equi_dim`` dimensions, pairwise cosine 0): the
   particle system must follow the one-dimensional reduction
   :math:`\dot\rho = 2e^{\beta\rho}(1-\rho)(1+(n-1)\rho)/D` solved by ``solve_ivp``; compared through
   the time at which :math:`\rho` reaches 0.9, for SA and USA.

Checks: the smallest relative energy change per recorded interval is :math:`\ge -10^{-12}` (SA and
USA); at least 2 clusters in the longest-lived multi-cluster plateau; no recorded increase of the
cluster count; a final count of 1; the causal first token's largest displacement
:math:`\le 10^{-12}`; every causal token within :math:`1-\cos \le 10^{-6}` of :math:`x_1(0)`; the
equiangular times within 0.1% of the ODE (RK4 error at ``equi_dt`` 0.01 is far smaller). These are
qualitative-topological predictions (notes: "energy monotonicity should hold to integrator
error"); the tolerances are integrator and round-off margins. Measured at the defaults (seed 0):
32 tokens gather into 3 clusters by t = 5.6, 2 metastable clusters from t = 9.3 to 120, one
cluster from t = 129 on; docs/results/verify.md.

``quick``: 24 tokens, ``t_max`` 400, shorter causal and USA runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmech.core.threads import blas_threads
from lmech.experiments.laws import first_crossing
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.theory import attention as at

ENERGY_FLOOR = -1e-12
EQUI_TOLERANCE = 1e-3


@dataclass
class AttentionParticlesConfig:
    n_tokens: int = 32
    dim: int = 3
    beta: float = 4.0
    t_max: float = 600.0
    dt: float = 0.1
    usa_t_max: float = 40.0
    usa_dt: float = 0.005
    causal_t_max: float = 300.0
    equi_n: int = 8
    equi_dim: int = 8
    equi_t_max: float = 6.0
    equi_dt: float = 0.01
    cluster_threshold: float = 1e-3
    n_record: int = 120

    def validate(self) -> None:
        require(self.n_tokens >= 4, f"n_tokens must be >= 4, got {self.n_tokens}")
        require(self.dim >= 3, f"dim must be >= 3 (single-cluster convergence is the d >= 3 statement), got {self.dim}")
        require(self.beta > 0, "beta must be positive")
        require(min(self.t_max, self.usa_t_max, self.causal_t_max, self.equi_t_max) > 0, "times must be positive")
        require(min(self.dt, self.usa_dt, self.equi_dt) > 0 and self.dt < self.t_max, "steps must be positive")
        require(self.usa_dt * np.exp(self.beta) < 1.0,
                f"usa_dt * exp(beta) = {self.usa_dt * np.exp(self.beta):.3g} must be < 1 (USA speeds ~ exp(beta))")
        require(2 <= self.equi_n <= self.equi_dim, "equi_n must be in [2, equi_dim]")
        require(0 < self.cluster_threshold < 1 and self.n_record >= 10, "cluster_threshold in (0,1), n_record >= 10")


def _record_times(t_max: float, n: int, dt: float) -> np.ndarray:
    return np.unique(np.concatenate([[0.0], np.geomspace(dt, t_max, n)]))


def cluster_plateaus(t: np.ndarray, counts: np.ndarray) -> list[tuple[int, float, float]]:
    """Runs of a constant cluster count: (count, first time, last time) in order."""
    out = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            out.append((int(counts[start]), float(t[start]), float(t[i - 1])))
            start = i
    return out


def run(cfg: AttentionParticlesConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: AttentionParticlesConfig, run, seed: int) -> dict:
    result: dict = {"n_tokens": cfg.n_tokens}
    x0 = at.random_sphere(cfg.n_tokens, cfg.dim, seed=seed)
    sims = {}
    sims["SA"] = at.simulate(x0, cfg.beta, cfg.t_max, cfg.dt, "SA", cluster_threshold=cfg.cluster_threshold,
                             record_times=_record_times(cfg.t_max, cfg.n_record, cfg.dt))
    sims["USA"] = at.simulate(x0, cfg.beta, cfg.usa_t_max, cfg.usa_dt, "USA", cluster_threshold=cfg.cluster_threshold,
                              record_times=_record_times(cfg.usa_t_max, cfg.n_record, cfg.usa_dt))
    sims["causal"] = at.simulate(x0, cfg.beta, cfg.causal_t_max, cfg.dt, "SA", causal=True,
                                 cluster_threshold=cfg.cluster_threshold,
                                 record_times=_record_times(cfg.causal_t_max, cfg.n_record, cfg.dt))
    for name, sim in sims.items():
        rel = np.diff(sim.energy) / sim.energy[:-1]
        result[f"{name}.min_rel_energy_change"] = float(rel.min())
        result[f"{name}.final_clusters"] = int(sim.clusters[-1])
        for k in range(len(sim.t)):
            run.log(k, **{f"{name}/t": sim.t[k], f"{name}/energy": sim.energy[k], f"{name}/clusters": sim.clusters[k]})

    sa = sims["SA"]
    plateaus = cluster_plateaus(sa.t, sa.clusters)
    multi = [p for p in plateaus if p[0] >= 2 and p[1] > 0]
    longest = max(multi, key=lambda p: np.log(p[2] / p[1]) if p[2] > p[1] else 0.0) if multi else None
    result["SA.plateaus"] = [list(p) for p in plateaus]
    result["SA.metastable_clusters"] = None if longest is None else longest[0]
    result["SA.metastable_span"] = None if longest is None else [longest[1], longest[2]]
    result["SA.count_increases"] = int(np.sum(np.diff(sa.clusters) > 0))
    single = np.flatnonzero(sa.clusters == 1)
    result["SA.time_to_one_cluster"] = float(sa.t[single[0]]) if len(single) else None

    causal = sims["causal"]
    result["causal.first_token_displacement"] = float(np.abs(causal.x[:, 0] - x0[0]).max())
    result["causal.max_gap_to_first_token"] = float(np.max(1.0 - causal.x[-1] @ x0[0]))

    equi = {}
    for model in ("SA", "USA"):
        xe = at.equiangular_configuration(cfg.equi_n, cfg.equi_dim, 0.0, seed=seed)
        sim = at.simulate(xe, cfg.beta, cfg.equi_t_max, cfg.equi_dt, model, record_every=1)
        off = ~np.eye(cfg.equi_n, dtype=bool)
        rho = np.array([(xk @ xk.T)[off].mean() for xk in sim.x])
        rho_ode = at.equiangular_rho(0.0, cfg.equi_n, cfg.beta, sim.t, model)
        result[f"equi.{model}.t90_predicted"] = first_crossing(sim.t, rho_ode, 0.9)
        result[f"equi.{model}.t90_measured"] = first_crossing(sim.t, rho, 0.9)
        result[f"equi.{model}.max_abs_rho_error"] = float(np.abs(rho - rho_ode).max())
        equi[model] = (sim.t, rho, rho_ode)
    _save_figure(run, cfg, sims, equi, result)
    return result


def check(result: dict) -> list[CheckRow]:
    rows = [
        CheckRow.at_least("SA: smallest relative energy change (energy non-decreasing)", ENERGY_FLOOR,
                          result["SA.min_rel_energy_change"]),
        CheckRow.at_least("USA: smallest relative energy change (energy non-decreasing)", ENERGY_FLOOR,
                          result["USA.min_rel_energy_change"]),
        CheckRow.at_least("clusters form: count on the longest multi-cluster plateau", 2,
                          result["SA.metastable_clusters"]),
        CheckRow.at_most("clusters only merge: recorded increases of the count", 0, result["SA.count_increases"]),
        CheckRow("clusters merge into one (d >= 3)", 1, result["SA.final_clusters"], "exact",
                 result["SA.final_clusters"] == 1),
        CheckRow.at_most("causal: displacement of the first token", 1e-12, result["causal.first_token_displacement"]),
        CheckRow.at_most("causal: max 1 - <x_i(T), x_1(0)> (all join token 1)", 1e-6,
                         result["causal.max_gap_to_first_token"]),
    ]
    for model in ("SA", "USA"):
        pred, meas = result[f"equi.{model}.t90_predicted"], result[f"equi.{model}.t90_measured"]
        quantity = f"equiangular start, {model}: time to cosine 0.9 (1-D reduction)"
        if pred is None or meas is None:
            rows.append(CheckRow(quantity, "n/a" if pred is None else pred, "n/a" if meas is None else meas,
                                 EQUI_TOLERANCE, False))
        else:
            rows.append(CheckRow.relative(quantity, pred, meas, EQUI_TOLERANCE))
    return rows


def _save_figure(run, cfg: AttentionParticlesConfig, sims: dict, equi: dict, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(17, 4))
    ax = fig.add_subplot(1, 4, 1)
    for name, color in (("SA", "C0"), ("causal", "C3"), ("USA", "C2")):
        sim = sims[name]
        ax.step(sim.t[1:], sim.clusters[1:], where="post", color=color,
                label=name if name != "causal" else "SA, causal")
    ax.set(xscale="log", yscale="log", xlabel="t", ylabel="clusters",
           title=f"n={cfg.n_tokens}, d={cfg.dim}, beta={cfg.beta:g}")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 2)
    for name, color in (("SA", "C0"), ("USA", "C2")):
        sim = sims[name]
        ax.plot(sim.t[1:], sim.energy[1:] / sim.energy[-1], color=color, label=name)
    ax.set(xscale="log", xlabel="t", ylabel="E_beta / E_beta(end)", title="interaction energy (non-decreasing)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 3, projection="3d")
    sim = sims["SA"]
    span = result["SA.metastable_span"]
    t_meta = np.sqrt(span[0] * span[1]) if span else sim.t[len(sim.t) // 2]
    k = int(np.argmin(np.abs(sim.t - t_meta)))
    for idx, (marker, label) in ((0, ("o", "t=0")), (k, ("^", f"t={sim.t[k]:.3g}")), (len(sim.t) - 1, ("*", "end"))):
        pts = sim.x[idx]
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], marker=marker, s=18 if marker != "*" else 80, label=label)
    ax.set(title="tokens on the sphere (first 3 coords)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 4, 4)
    for model, color in (("SA", "C0"), ("USA", "C2")):
        t, rho, rho_ode = equi[model]
        ax.plot(t, rho, color=color, lw=2.5, alpha=0.6, label=f"{model}: particles")
        ax.plot(t, rho_ode, "k--", lw=0.9)
    ax.set(xlabel="t", ylabel="pairwise cosine rho", title="equiangular start vs 1-D ODE (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "attention-particles")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="attention-particles",
    summary="self-attention as particles on the sphere: energy monotone, clusters form and merge, causal token 1 fixed",
    config=AttentionParticlesConfig,
    run=run,
    check=check,
    quick={"n_tokens": 24, "t_max": 400.0, "causal_t_max": 150.0, "usa_t_max": 20.0},
)
