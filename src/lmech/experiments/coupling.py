r"""Train-test coupling under feature learning, and the frozen-kernel limit (Litman & Guo 2026,
Sec. 3 and 5, App. H; notes ``shared/research/generalization-theory.md`` 1.2-1.4 and 5).

Two arms, both full-batch gradient descent on the squared loss :math:`\Phi = \frac1{2n}\|u-y\|^2`
(:func:`lmech.probes.gramian.half_mse`), float64, recorded by :class:`lmech.probes.gramian.PathRecorder`:

* **rich** — a deep tanh MLP (``depth`` hidden layers of ``width``, small initialization
  ``init_scale``) learns a teacher-student regression in ``d_in`` dimensions (standardized targets).
  The kernel grows and aligns with the target (feature learning). The step size is normalized,
  :math:`\eta_k = c\,n/\lambda_{\max}(K_{k-1})` with :math:`c` = ``step_size``, so the run stays
  stable while the kernel grows. Checks: the predicted test displacement :math:`A\,\Delta U_S`
  (:math:`A = G_Q D^+`) against the realized :math:`\Delta U_Q` (correlation >= 0.99, Thm 5.1) on a
  run whose kernel drifted at least 2x (:math:`\|K_t-K_0\|_2/\|K_0\|_2`, peak over the run; the paper
  reports 0.991 at 4.8x); reservoir invisibility :math:`\|G_Q\psi\|/\|G_Q\|_2 \le 10^{-3}` on the
  eigenvectors of :math:`W_S` with :math:`\omega \le 10^{-6}\omega_{\max}` (Prop. 3.2, notes check 2;
  at least one such direction must exist: low-dimensional inputs give the near-null space).
* **lazy** — a very wide one-hidden-layer tanh net with a small step (:math:`c` =
  ``lazy_step_size``): the frozen-kernel limit. Checks: the eigenvalues of :math:`W_S` against
  :math:`\frac n2(1-e^{-2\lambda_iT/n})` with :math:`\lambda_i` the eigenvalues of the initial kernel
  (within 5%, on modes whose predicted value is at least :math:`10^{-3}\,n/2`: below, the
  difference of float64 rounding and the tiny drift of near-null kernel modes dominate); the
  dissipation identity (within 1%); :math:`A = G_Q D^+` against kernel regression
  :math:`K_{QS}K_{SS}^+` (operators compared on the kernel eigenvectors with
  :math:`\lambda T/n \ge 10^{-2}`, where both are determined, and predictions on the realized
  :math:`\Delta U_S`; within 5%).

``every`` > 1 records every ``every`` steps with the kernel frozen in between (the recorder's
exact integration of a frozen kernel): the table in docs/results/signal-reservoir.md shows how the
coupling degrades with the recording interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lmech.experiments.loop import ProbeLevel
from lmech.experiments.signal_runs import initial_kernel, pearson, record_training
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.models import MLP
from lmech.probes.gramian import frozen_gramian_eigenvalues
from lmech.probes.ntk import kernel_target_alignment


@dataclass
class CouplingConfig:
    d_in: int = 4
    teacher_width: int = 4
    n_train: int = 256
    n_query: int = 256
    width: int = 48
    depth: int = 3
    activation: Literal["tanh", "relu"] = "tanh"
    init_scale: float = 0.3
    step_size: float = 0.3
    steps: int = 400
    every: int = 1
    readout_every: int = 20
    lazy_width: int = 2048
    lazy_step_size: float = 0.01
    lazy_steps: int = 300
    null_tol: float = 1e-6
    rcond: float = 1e-8
    arms: Literal["both", "rich", "lazy"] = "both"
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) every readout

    def validate(self) -> None:
        require(self.d_in > 0 and self.teacher_width > 0, "d_in and teacher_width must be positive")
        require(self.n_train >= 8 and self.n_query >= 2, "n_train must be >= 8 and n_query >= 2")
        require(self.width > 0 and self.depth > 0 and self.lazy_width > 0, "widths and depth must be positive")
        require(0 < self.step_size < 2 and 0 < self.lazy_step_size < 2,
                "step_size and lazy_step_size (eta lambda_max / n) must be in (0, 2)")
        require(self.every >= 1 and self.steps % self.every == 0 and self.readout_every % self.every == 0,
                "every must be >= 1 and divide steps and readout_every")
        require(self.steps >= self.readout_every > 0 and self.lazy_steps > 0, "steps, readout_every, lazy_steps > 0")
        require(0 < self.null_tol < 1 and 0 < self.rcond < 1, "null_tol and rcond must be in (0, 1)")


def _data(cfg: CouplingConfig, seed: int):
    from lmech.tasks import teacher_student

    ts = teacher_student(n_train=cfg.n_train, n_test=cfg.n_query, d_in=cfg.d_in, teacher_width=cfg.teacher_width,
                         teacher_depth=1, activation="tanh", seed=seed)
    sd = ts.y_train.double().std()
    return (ts.x_train.double(), ts.y_train.double() / sd, ts.x_test.double(), ts.y_test.double() / sd)


def run(cfg: CouplingConfig, run, seed: int) -> dict:
    x, y, xq, yq = _data(cfg, seed)
    result: dict = {"n_train": cfg.n_train, "n_query": cfg.n_query}
    figure_data: dict = {}
    if cfg.arms in ("both", "rich"):
        result.update(_rich(cfg, run, seed, x, y, xq, yq, figure_data))
    if cfg.arms in ("both", "lazy"):
        result.update(_lazy(cfg, run, seed, x, y, xq, yq, figure_data))
    from lmech.experiments.figures.signal_reservoir import coupling_figure

    run.save_figure(coupling_figure(figure_data), "coupling")
    return result


def _rich(cfg, run, seed, x, y, xq, yq, fig) -> dict:
    torch.manual_seed(seed)
    model = MLP(cfg.d_in, 1, width=cfg.width, depth=cfg.depth, activation=cfg.activation,
                init_scale=cfg.init_scale).double()
    align0 = kernel_target_alignment(initial_kernel(model, x), y.reshape(-1))

    def on_readout(step, rec, r, row):
        row["target_alignment"] = kernel_target_alignment(rec.K_last, y.reshape(-1))

    rr = record_training(model, x, y, xq, yq, optimizer="gd", lr=None, steps=cfg.steps, every=cfg.every,
                         readout_every=cfg.readout_every, run=run, x_test=xq, y_test=yq, step_size=cfg.step_size,
                         adaptive=True, seed=seed, readout_kwargs=dict(null_tol=cfg.null_tol, rcond=cfg.rcond),
                         on_readout=on_readout, probes=cfg.probes)
    rows = rr.rows
    final = rr.readouts[-1][1]
    pred, actual = rr.recorder.predicted_test_displacement(rcond=cfg.rcond)
    fig["rich"] = dict(rows=rows, pred=pred.numpy(), actual=actual.numpy(),
                       spectra=[(s, r.eigenvalues, r.split.cutoff) for s, r in rr.readouts[:: max(len(rr.readouts) // 4, 1)]]
                       + [(rr.readouts[-1][0], final.eigenvalues, final.split.cutoff)],
                       ratios=final.eigenvalues / final.eigenvalues[0], g_psi=final.extras["G_psi_over_G"],
                       null_tol=cfg.null_tol)
    return {
        "rich_coupling_corr": final.coupling_corr,
        "rich_coupling_rel_err": final.coupling_rel_err,
        "rich_response_corr": final.response_corr,
        "rich_peak_drift": max(r["drift_op"] for r in rows),
        "rich_final_drift": rows[-1]["drift_op"],
        "rich_peak_norm_ratio": max(r["kernel_norm_ratio"] for r in rows),
        "rich_alignment_init": align0,
        "rich_alignment_final": rows[-1]["target_alignment"],
        "rich_invisibility": final.invisibility,
        "rich_n_null": final.n_null,
        "rich_invisibility_bound_ok": final.invisibility_bound_ok,
        "rich_dissipation_rel_err": final.dissipation_rel_err,
        "rich_max_lin_error": max(r["lin_error"] for r in rows),
        "rich_train_loss": rows[-1]["loss"],
        "rich_query_loss": rows[-1]["query_loss"],
        "rich_n_channel": final.split.n_channel,
        "rich_gap_ratio": final.split.gap_ratio,
        "rich_min_coupling_corr": min(r["coupling_corr"] for r in rows),
        "rich_corr_coupling_vs_drift": pearson([r["coupling_corr"] for r in rows], [r["drift_op"] for r in rows]),
    }


def _lazy(cfg, run, seed, x, y, xq, yq, fig) -> dict:
    torch.manual_seed(seed)
    model = MLP(cfg.d_in, 1, width=cfg.lazy_width, depth=1, activation="tanh").double()
    rr = record_training(model, x, y, xq, yq, optimizer="gd", lr=None, steps=cfg.lazy_steps, every=1,
                         readout_every=cfg.lazy_steps, run=None, step_size=cfg.lazy_step_size, seed=seed,
                         readout_kwargs=dict(null_tol=cfg.null_tol, rcond=cfg.rcond), probes=cfg.probes,
                         probe_prefix="lazy/", probe_run=run)
    rec, r = rr.recorder, rr.readouts[-1][1]
    n, T = rec.n, rec.path.time
    lam, V = torch.linalg.eigh(rec.K0)
    lam, V = lam.flip(0), V.flip(1)
    predicted = frozen_gramian_eigenvalues(lam.numpy(), T, n)
    measured = r.eigenvalues
    mask = predicted >= 1e-3 * n / 2
    rel = np.abs(measured - predicted) / predicted
    A = rec.coupling_operator(rcond=cfg.rcond)
    Kr = rec.kernel_regression_operator(rcond=cfg.rcond)
    well = V[:, (lam * T / n >= 1e-2)]
    op_diff = float(((A - Kr) @ well).norm() / (Kr @ well).norm())
    u_S, _ = rec.outputs()
    dU_S = u_S - rec.path.u_S0
    pred_A, actual = A @ dU_S, rec.predicted_test_displacement(rcond=cfg.rcond)[1]
    pred_K = Kr @ dU_S
    pred_diff = float((pred_A - pred_K).norm() / pred_K.norm())
    fig["lazy"] = dict(predicted=predicted, measured=measured, mask=mask, n=n, pred_A=pred_A.numpy(),
                       pred_K=pred_K.numpy(), actual=actual.numpy(), time=T)
    if run is not None:
        run.log(cfg.lazy_steps, lazy_dissipation_rel_err=r.dissipation_rel_err, lazy_drift_op=r.drift_op)
        run.log_array(cfg.lazy_steps, "lazy_W_spectrum", measured)
        run.log_array(cfg.lazy_steps, "lazy_W_frozen_prediction", predicted)
    return {
        "lazy_W_max_rel_err": float(rel[mask].max()),
        "lazy_W_median_rel_err": float(np.median(rel[mask])),
        "lazy_W_modes_compared": int(mask.sum()),
        "lazy_dissipation_rel_err": r.dissipation_rel_err,
        "lazy_A_vs_kernel_regression": op_diff,
        "lazy_prediction_vs_kernel_regression": pred_diff,
        "lazy_directions_compared": int(well.shape[1]),
        "lazy_drift": r.drift_op,
        "lazy_time": T,
        "lazy_coupling_corr": r.coupling_corr,
    }


def check(result: dict) -> list[CheckRow]:
    rows = []
    if "rich_coupling_corr" in result:
        rows += [
            CheckRow.at_least("rich: peak kernel drift ||K_t-K_0||/||K_0|| (premise)", 2.0, result["rich_peak_drift"]),
            CheckRow.at_least("rich: corr(A dU_S, dU_Q) (Thm 5.1)", 0.99, result["rich_coupling_corr"]),
            CheckRow.at_least("rich: near-null directions of W_S (omega <= null_tol omega_max)", 1,
                              result["rich_n_null"]),
            CheckRow.at_most("rich: invisibility max ||G psi||/||G|| on the near-null space", 1e-3,
                             result["rich_invisibility"]),
            CheckRow("rich: ||G psi_j||^2 <= c_Q omega_j for every eigenvector", "all", str(result["rich_invisibility_bound_ok"]),
                     "exact", bool(result["rich_invisibility_bound_ok"])),
        ]
    if "lazy_W_max_rel_err" in result:
        rows += [
            CheckRow.at_most("lazy: kernel drift (premise)", 0.05, result["lazy_drift"]),
            CheckRow.at_most("lazy: W_S eigenvalues vs n/2 (1-exp(-2 lambda T/n)), max rel err", 0.05,
                             result["lazy_W_max_rel_err"]),
            CheckRow.at_most("lazy: dissipation identity rel err", 0.01, result["lazy_dissipation_rel_err"]),
            CheckRow.at_most("lazy: A vs K_QS K_SS^+ on lambda T/n >= 1e-2", 0.05, result["lazy_A_vs_kernel_regression"]),
            CheckRow.at_most("lazy: A dU_S vs K_QS K_SS^+ dU_S", 0.05, result["lazy_prediction_vs_kernel_regression"]),
        ]
    return rows


EXPERIMENT = Experiment(
    name="coupling",
    summary="train-test coupling A = G D^+ under feature learning (drift >= 2x) and the frozen-kernel limit",
    config=CouplingConfig,
    run=run,
    check=check,
    quick={"n_train": 64, "n_query": 64, "width": 32, "steps": 200, "readout_every": 20, "lazy_width": 512,
           "lazy_steps": 150},
)
