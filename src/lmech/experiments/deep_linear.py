r"""Deep linear networks: Saxe-McClelland-Ganguli mode dynamics measured against their closed form.

Theory: :mod:`lmech.theory.deep_linear` (Saxe, McClelland & Ganguli 2014; research notes 1.1 and
2.1). Loss :math:`\tfrac12\,\mathrm{mean}_i\lVert f(x_i) - y_i\rVert^2`, full-batch gradient descent
with step ``eta`` on a :class:`lmech.models.DeepLinear` network; time is :math:`t = \eta\cdot` step.

Data. ``n_samples`` inputs in :math:`\mathbb R^d`, exactly whitened (:math:`X^\top X/n = I`), and
targets :math:`y = Tx` with the teacher :math:`T = U\,\mathrm{diag}(s)\,V^\top` (random orthogonal
``U``, ``V``; ``singular_values`` ``s``). The training loss then *is* the population loss of the
theory, so the only approximation measured is the one under test.

Three measurements, one per prediction:

1. **Aligned, balanced start** (per depth in ``depths``): every layer carries
   :math:`u_0^{1/L}` on each mode (:func:`~lmech.theory.deep_linear.aligned_init`). Predicted:
   mode :math:`\mu` reaches half its strength at the closed-form time
   :math:`t_{1/2} = F(s_\mu/2) - F(u_0)` (logistic for depth 2, hypergeometric for depth L).
2. **Random small start** (depth 2, iid :math:`\mathcal N(0, \sigma^2)` entries, ``width``):
   predicted :math:`t_{1/2} = \frac1{2s}\ln\frac{s-u_{\rm eff}}{u_{\rm eff}}` with the effective
   initial strength :math:`u_{\rm eff} = \tfrac14\lVert W_1 v_\mu + W_2^\top u_\mu\rVert^2`
   (:func:`~lmech.theory.deep_linear.effective_u0`); the modes are learned in the order of
   :math:`s_\mu`.
3. **Balancedness drift** (depth 2, random start of scale ``drift_init_scale``): after time
   ``drift_time``, :math:`\lVert D(t) - D(0)\rVert_F` with :math:`D = W_2^\top W_2 - W_1W_1^\top`
   is predicted to be :math:`\eta\lVert C(t)\rVert_F + O(\eta^2)`, with :math:`C` integrated along
   the gradient flow by ``solve_ivp``: proportional to :math:`\eta` (log-log slope 1).

Checks (tolerance ``tolerance`` = 5% relative, the issue's target): every mode's half-time for
the aligned start at every depth and for the random start; the random-start learning order
(exact); the drift slope against eta; the drift over :math:`\eta\lVert C\rVert` at each eta.

Discretization: GD multiplies a small mode by :math:`(1 + 2\eta s)` per step instead of
:math:`e^{2\eta s}`, a relative time error of about :math:`\eta s` (0.4% at the defaults).
Measured at the defaults: every half-time within 0.7% (docs/results/verify.md). The random-start
prediction needs ``width`` well above the teacher's rank: at width 8 = d the modes compete for
hidden directions and the half-times of the weakest modes were 45-50% late (width 16: <= 4%,
width >= 32: <= 1.2%, three seeds each).

``quick``: depths 2 and 3, three modes, ``eta`` 2e-3, shorter drift run (same checks).

Every GD run is a :class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a Monitor
every ``steps // 10`` steps, columns ``aligned_L<depth>/probe/...``, ``random/probe/...``,
``drift_eta<eta>/probe/...``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmech.core.threads import blas_threads
from lmech.experiments.laws import first_crossing, log_series, loglog_slope, order_row, parse_list
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, never, no_evaluation, train
from lmech.models import DeepLinear
from lmech.theory import deep_linear as dl


@dataclass
class DeepLinearConfig:
    d: int = 8
    singular_values: str = "4,2,1,0.5"
    depths: str = "2,3"
    u0: float = 1e-3  # aligned start: initial end-to-end strength of every mode
    eta: float = 1e-3
    width: int = 32
    init_scale: float = 1e-3  # random start: std of every weight entry
    n_samples: int = 64
    drift_etas: str = "4e-3,2e-3,1e-3"
    drift_time: float = 2.0
    drift_init_scale: float = 0.3
    tolerance: float = 0.05
    log_every: int = 20
    # instruments: none, or a lmech.Monitor preset (economy, full) on every GD run, every steps // 10
    probes: ProbeLevel = "none"

    def validate(self) -> None:
        s = parse_list(self.singular_values, float, "singular_values")
        depths = parse_list(self.depths, int, "depths")
        etas = parse_list(self.drift_etas, float, "drift_etas")
        require(all(v > 0 for v in s), "singular_values must be positive")
        require(len(set(s)) == len(s), "singular_values must be distinct (the learning order is checked)")
        require(len(s) <= self.d, f"at most d={self.d} singular values, got {len(s)}")
        require(all(1 <= L <= 8 for L in depths), f"depths must be in 1..8, got {self.depths!r}")
        require(0 < self.u0 < min(s) / 2, f"u0 must be in (0, min(s)/2), got {self.u0}")
        require(self.eta > 0 and all(e > 0 for e in etas), "eta and drift_etas must be positive")
        require(self.width >= len(s), f"width must be >= the number of modes ({len(s)})")
        require(self.n_samples >= self.d, f"n_samples must be >= d to whiten, got {self.n_samples}")
        require(self.init_scale > 0 and self.drift_init_scale > 0 and self.drift_time > 0,
                "init scales and drift_time must be positive")
        require(self.tolerance > 0 and self.log_every > 0, "tolerance and log_every must be positive")


def make_problem(cfg: DeepLinearConfig, seed: int):
    """Whitened inputs, the teacher's singular vectors and values, and the targets (float64)."""
    rng = np.random.default_rng(seed)
    s = np.array(parse_list(cfg.singular_values, float), dtype=np.float64)
    order = np.argsort(-s)
    s = s[order]
    r = len(s)
    u_full, _ = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))
    v_full, _ = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))
    u_mat, v_mat = u_full[:, :r], v_full[:, :r]
    x = rng.standard_normal((cfg.n_samples, cfg.d))
    evals, evecs = np.linalg.eigh(x.T @ x / cfg.n_samples)
    x = x @ evecs @ np.diag(evals ** -0.5) @ evecs.T  # exactly whitened
    teacher = u_mat @ np.diag(s) @ v_mat.T
    return torch.tensor(x), torch.tensor(x @ teacher.T), u_mat, v_mat, s, teacher


def _set_weights(model: DeepLinear, weights: list[np.ndarray]) -> None:
    with torch.no_grad():
        for layer, w in zip(model.layers, weights):
            layer.weight.copy_(torch.tensor(w))


def half_sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac12\,\mathrm{mean}_i\lVert f(x_i) - y_i\rVert^2`, the training loss."""
    return 0.5 * (out - target).pow(2).sum(1).mean()


def gd_loop(model: DeepLinear, x, y, eta: float, steps: int, before_step=None, run=None,
            probes: ProbeLevel = "none", prefix: str = "") -> TrainingLoop:
    """Full-batch GD on :func:`half_sse` as a :class:`TrainingLoop` (``before_step(step)`` runs
    before each step's forward; a Monitor every ``steps // 10`` steps under ``prefix``)."""
    def loss(step: int) -> torch.Tensor:
        if before_step is not None:
            before_step(step)
        return half_sse(model(x), y)

    loop = TrainingLoop(model, torch.optim.SGD(model.parameters(), lr=eta), steps, max(1, steps // 10), loss,
                        no_evaluation, watch="", eval_at=never, probes=probes, probe_batch=(x, y),
                        probe_loss=half_sse, probe_prefix=prefix)
    train(run, loop)
    return loop


def train_modes(model: DeepLinear, x, y, eta: float, steps: int, u_mat, v_mat, run=None,
                probes: ProbeLevel = "none", prefix: str = "") -> np.ndarray:
    """Full-batch GD; returns the mode strengths diag(U^T W V) after every step (steps+1, r)."""
    ut, vt = torch.tensor(u_mat), torch.tensor(v_mat)
    out = np.empty((steps + 1, u_mat.shape[1]))

    def record(step: int) -> None:
        with torch.no_grad():
            out[step] = torch.diagonal(ut.T @ model.end_to_end() @ vt).numpy()

    gd_loop(model, x, y, eta, steps, record, run, probes, prefix)
    record(steps)
    return out


def run(cfg: DeepLinearConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: DeepLinearConfig, run, seed: int) -> dict:
    x, y, u_mat, v_mat, s, teacher = make_problem(cfg, seed)
    r = len(s)
    result: dict = {"singular_values": s.tolist(), "depths": parse_list(cfg.depths, int), "tolerance": cfg.tolerance,
                    "curves": {}}
    rng = np.random.default_rng(seed + 1)

    # 1. aligned, balanced start, per depth
    for depth in result["depths"]:
        predicted = [dl.half_time(float(si), cfg.u0, depth) for si in s]
        steps = int(np.ceil(1.3 * max(predicted) / cfg.eta))
        torch.manual_seed(seed)
        model = DeepLinear(cfg.d, cfg.d, cfg.width, depth, init_scale=1.0).double()
        rots = [np.linalg.qr(rng.standard_normal((cfg.width, cfg.width)))[0] for _ in range(depth - 1)]
        _set_weights(model, dl.aligned_init(u_mat, v_mat, np.full(r, cfg.u0), depth, cfg.width, rots))
        modes = train_modes(model, x, y, cfg.eta, steps, u_mat, v_mat, run, cfg.probes, f"aligned_L{depth}/")
        t = cfg.eta * np.arange(steps + 1)
        theory = np.stack([dl.mode_trajectory(t, float(si), cfg.u0, depth) for si in s], axis=1)
        for m in range(r):
            result[f"aligned.L{depth}.mode{m + 1}.t_half_predicted"] = predicted[m]
            result[f"aligned.L{depth}.mode{m + 1}.t_half_measured"] = first_crossing(t, modes[:, m], s[m] / 2)
        result[f"aligned.L{depth}.max_abs_error_over_s"] = float(np.max(np.abs(modes - theory) / s))
        log_series(run, np.arange(steps + 1), {f"aligned_L{depth}/u{m + 1}": modes[:, m] / s[m] for m in range(r)},
                   every=cfg.log_every)
        result["curves"][f"aligned_L{depth}"] = (t, modes / s, theory / s)

    # 2. random small start, depth 2
    torch.manual_seed(seed + 2)
    model = DeepLinear(cfg.d, cfg.d, cfg.width, 2, init_scale=cfg.init_scale).double()
    w1, w2 = (w.detach().numpy().copy() for w in model.weights())
    u_eff = [dl.effective_u0(w1, w2, u_mat[:, m], v_mat[:, m]) for m in range(r)]
    predicted = [dl.half_time(float(s[m]), u_eff[m]) for m in range(r)]
    steps = int(np.ceil(1.3 * max(predicted) / cfg.eta))
    modes = train_modes(model, x, y, cfg.eta, steps, u_mat, v_mat, run, cfg.probes, "random/")
    t = cfg.eta * np.arange(steps + 1)
    measured = [first_crossing(t, modes[:, m], s[m] / 2) for m in range(r)]
    for m in range(r):
        result[f"random.mode{m + 1}.u_eff"] = u_eff[m]
        result[f"random.mode{m + 1}.t_half_predicted"] = predicted[m]
        result[f"random.mode{m + 1}.t_half_measured"] = measured[m]
    finite = [(tm if tm is not None else np.inf) for tm in measured]
    result["random.learning_order"] = [int(i) + 1 for i in np.argsort(finite)]
    log_series(run, np.arange(steps + 1), {f"random/u{m + 1}": modes[:, m] / s[m] for m in range(r)},
               every=cfg.log_every)
    result["curves"]["random"] = (t, modes / s, predicted)

    # 3. balancedness drift under GD vs eta * C(t) from the gradient flow
    torch.manual_seed(seed + 3)
    model0 = DeepLinear(cfg.d, cfg.d, cfg.width, 2, init_scale=cfg.drift_init_scale).double()
    w0 = [w.detach().numpy().copy() for w in model0.weights()]
    flow = dl.gradient_flow(w0, np.eye(cfg.d), teacher, np.array([0.0, cfg.drift_time]))
    c_norm = float(np.linalg.norm(flow.drift_rate[-1][0]))
    d0 = dl.balancedness(w0)[0]
    etas = sorted(parse_list(cfg.drift_etas, float), reverse=True)
    drifts = []
    for eta in etas:
        model = DeepLinear(cfg.d, cfg.d, cfg.width, 2).double()
        _set_weights(model, w0)
        gd_loop(model, x, y, eta, int(round(cfg.drift_time / eta)), run=run, probes=cfg.probes,
                prefix=f"drift_eta{eta:g}/")
        w_end = [w.detach().numpy() for w in model.weights()]
        drifts.append(float(np.linalg.norm(dl.balancedness(w_end)[0] - d0)))
        result[f"drift.eta{eta:g}.measured"] = drifts[-1]
        result[f"drift.eta{eta:g}.predicted"] = eta * c_norm
    result["drift.etas"] = etas
    result["drift.flow_integral_norm"] = c_norm
    result["drift.slope"] = loglog_slope(etas, drifts)[0]

    _save_figure(run, cfg, result)
    result.pop("curves")
    return result


def check(result: dict) -> list[CheckRow]:
    tol = result.get("tolerance", 0.05)
    rows = []
    s = result["singular_values"]
    for depth in result["depths"]:
        for m in range(len(s)):
            key = f"aligned.L{depth}.mode{m + 1}"
            rows.append(_relative(f"t_1/2 depth {depth}, aligned, mode s={s[m]:g}",
                                  result[f"{key}.t_half_predicted"], result[f"{key}.t_half_measured"], tol))
    for m in range(len(s)):
        key = f"random.mode{m + 1}"
        rows.append(_relative(f"t_1/2 depth 2, random init, mode s={s[m]:g}",
                              result[f"{key}.t_half_predicted"], result[f"{key}.t_half_measured"], tol))
    rows.append(order_row("random init: modes learned in order of s", list(range(1, len(s) + 1)),
                          result["random.learning_order"]))
    rows.append(CheckRow.relative("balancedness drift: slope of log drift vs log eta", 1.0, result["drift.slope"], tol))
    for eta in result["drift.etas"]:
        rows.append(_relative(f"balancedness drift at eta={eta:g} (eta * ||C(t)||)", result[f"drift.eta{eta:g}.predicted"],
                              result[f"drift.eta{eta:g}.measured"], tol))
    return rows


def _relative(quantity: str, predicted: float, measured: float | None, tol: float) -> CheckRow:
    if measured is None:
        return CheckRow(quantity, predicted, "not reached", tol, False)
    return CheckRow.relative(quantity, predicted, measured, tol)


def _save_figure(run, cfg: DeepLinearConfig, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["singular_values"]
    depths = result["depths"]
    fig, axes = plt.subplots(1, len(depths) + 2, figsize=(4.2 * (len(depths) + 2), 3.8))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(s)))
    for ax, depth in zip(axes, depths):
        t, meas, theory = result["curves"][f"aligned_L{depth}"]
        for m in range(len(s)):
            ax.plot(t, meas[:, m], color=colors[m], lw=2, label=f"s={s[m]:g}")
            ax.plot(t, theory[:, m], color="k", ls="--", lw=0.9)
        ax.set(title=f"depth {depth}, aligned start (u0={cfg.u0:g})", xlabel="t = eta * step", ylabel="u_mu / s_mu")
    axes[0].legend(loc="lower right", fontsize=8, title="GD (solid), closed form (dashed)", title_fontsize=7)
    ax = axes[len(depths)]
    t, meas, predicted = result["curves"]["random"]
    for m in range(len(s)):
        ax.plot(t, meas[:, m], color=colors[m], lw=2)
        ax.axvline(predicted[m], color=colors[m], ls=":", lw=1)
    ax.set(title=f"depth 2, random start (sigma={cfg.init_scale:g}, width {cfg.width})", xlabel="t",
           ylabel="u_mu / s_mu")
    ax.text(0.02, 0.95, "dotted: predicted t_1/2", transform=ax.transAxes, fontsize=8, va="top")
    ax = axes[-1]
    etas = np.array(result["drift.etas"])
    ax.loglog(etas, [result[f"drift.eta{e:g}.measured"] for e in etas], "o", label="GD, measured")
    ax.loglog(etas, etas * result["drift.flow_integral_norm"], "k--", label="eta * ||C(t)|| (flow)")
    ax.set(title=f"balancedness drift at t={cfg.drift_time:g}", xlabel="eta", ylabel="||D(t) - D(0)||_F")
    ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    run.save_figure(fig, "deep-linear")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="deep-linear",
    summary="Saxe et al. deep linear nets: mode learning times (closed form, depth 2 and L) and balancedness drift ~ eta",
    config=DeepLinearConfig,
    run=run,
    check=check,
    quick={"singular_values": "4,2,1", "eta": 2e-3, "drift_etas": "4e-3,2e-3", "drift_time": 1.0},
)
