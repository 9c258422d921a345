r"""Central flows: the time-averaged trajectory of gradient descent at the edge of stability
follows an ODE whose sharpness is pinned at :math:`2/\eta` (Cohen, Damian, Talwalkar, Kolter &
Lee, *Understanding Optimization in Deep Learning with Central Flows*, ICLR 2025, arXiv
2410.24206; companion site centralflows.github.io).

The central flow for GD with one eigenvalue at the edge (the paper's form):

.. math::  \frac{dw}{dt} = -\eta\Big[\nabla L(w) + \tfrac12\,\sigma^2(t)\,\nabla S(w)\Big],

:math:`S(w) = \lambda_1(\nabla^2 L(w))` the sharpness, :math:`\nabla S = \nabla_w (u^\top
\nabla^2 L(w)\, u)` for the top eigenvector :math:`u` (held fixed: a third derivative of the
loss), and :math:`\sigma^2 \ge 0` the variance of GD's oscillation along :math:`u`, which is
zero while :math:`S < 2/\eta` (the flow is then gradient flow) and otherwise the value that keeps
:math:`S = 2/\eta` (equivalently: gradient flow projected onto :math:`\{S \le 2/\eta\}`). The
time-averaged loss it predicts is :math:`L(w) + \frac12\sigma^2 S(w)` (the oscillation adds
:math:`\frac12 S x^2` with :math:`\mathbb E x^2 = \sigma^2`), i.e. :math:`L + \sigma^2/\eta`
at the edge.

Discretization (this module): Euler steps of ``cf_dt`` GD steps (time :math:`\eta\,`cf_dt);
at each, :math:`S, u` by Lanczos (warm-started), :math:`\nabla S` by differentiating
:math:`u^\top H u` once more, and :math:`\sigma^2` chosen so that the linearized sharpness after
the step is :math:`2/\eta` when gradient flow would cross it:
:math:`\sigma^2 = \max\{0,\ 2(S - \eta\,\mathrm{dt}\,\langle\nabla S,\nabla L\rangle - 2/\eta)/
(\eta\,\mathrm{dt}\,\lVert\nabla S\rVert^2)\}` (this also corrects any drift of :math:`S` away
from :math:`2/\eta`).

Model and why: a tanh MLP (two hidden layers of ``width``, no normalization layers) on the first
``n_train`` MNIST-1D examples, MSE :math:`\frac12\mathrm{mean}\lVert f - e_y\rVert^2`, float64. The
flow needs third derivatives of the loss; tanh and Linear layers have exact derivatives of every
order under autograd, while LayerNorm's derivatives pass through :math:`(\mathrm{var}+\epsilon)^{-1/2}`
and the central-flows authors' documentation warns about PyTorch's LayerNorm for them, so the
model has none. GD with ``lr`` runs ``steps`` steps from the same initialization; gradient flow
(the same integrator with :math:`\sigma^2 = 0`) is the baseline.

Checks (after GD first reaches :math:`2/\eta`, on the measurements every ``eval_every`` steps):

* the central flow's sharpness stays within 2% of :math:`2/\eta` (its construction);
* GD's sharpness, averaged over the window, within 10% of the central flow's (the edge-of-stability
  entry's tolerance);
* GD's loss smoothed over ``window`` steps against the central flow's predicted loss
  :math:`L + \frac12\sigma^2 S`: median relative error at most 0.25;
* GD stays closer to the central flow than to gradient flow: median over the window of
  :math:`\lVert w_{GD} - w_{CF}\rVert / \lVert w_{GD} - w_{GF}\rVert` at most 0.5.

The tolerances are this module's estimates (the paper reports close agreement on larger nets
trained longer); a FAIL is a result (docs/results/verify.md). Not among the default laws.
``quick``: 600 steps.

GD trains on :class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a Monitor every
``eval_every`` steps, columns ``gd/probe/...``); the central flow and gradient flow keep their own
Euler integrator: they are ODE solutions built from the loss's gradient and sharpness, not training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmech.core.threads import blas_threads
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, never, no_evaluation, train
from lmech.models import MLP
from lmech.probes.sharpness import sharpness
from lmech.tasks import mnist1d

CF_SHARPNESS_TOL = 0.02
GD_SHARPNESS_TOL = 0.10
LOSS_TOL = 0.25
DISTANCE_RATIO = 0.5


@dataclass
class CentralFlowsConfig:
    n_train: int = 100          # MNIST-1D examples
    width: int = 32             # hidden units per layer (two tanh layers)
    lr: float = 0.2             # GD step size eta (threshold 2/eta = 10)
    steps: int = 1000           # GD steps
    cf_dt: float = 0.5          # central-flow Euler step, in GD steps
    eval_every: int = 10        # GD steps between comparisons
    window: int = 20            # GD steps in the loss smoothing window (centered)
    lanczos_tol: float = 1e-6   # Lanczos tolerance for S and u
    probes: ProbeLevel = "none"  # instruments on GD: none, or a lmech.Monitor preset (economy, full) every eval_every

    def validate(self) -> None:
        require(self.n_train >= 10 and self.width >= 1, "n_train >= 10 and width >= 1")
        require(self.lr > 0 and self.steps >= 50, "lr > 0 and steps >= 50")
        require(0 < self.cf_dt <= 1, f"cf_dt must be in (0, 1] GD steps, got {self.cf_dt}")
        require(1 <= self.eval_every <= self.steps // 5, "eval_every must be in [1, steps/5]")
        require(self.window >= 2, "window must be >= 2 steps")
        require(self.lanczos_tol > 0, "lanczos_tol must be positive")


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def _grad_and_sharpness_grad(model, x, y, u_flat):
    """(L, grad L, u^T H u, grad_w (u^T H u)) as flat float64 vectors, u held fixed."""
    params = list(model.parameters())
    loss = mse(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    g_flat = torch.cat([t.reshape(-1) for t in g])
    hu = torch.autograd.grad(g_flat @ u_flat, params, create_graph=True)
    s = torch.cat([t.reshape(-1) for t in hu]) @ u_flat
    grad_s = torch.autograd.grad(s, params)
    return float(loss.detach()), g_flat.detach(), float(s.detach()), torch.cat([t.reshape(-1) for t in grad_s])


def _set_flat(model, flat: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def run(cfg: CentralFlowsConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: CentralFlowsConfig, run, seed: int) -> dict:
    data = mnist1d(n_train=cfg.n_train, n_test=10)
    x = data.x_train[: cfg.n_train].double()
    y = torch.nn.functional.one_hot(data.y_train[: cfg.n_train], data.num_classes).double()
    torch.manual_seed(seed)
    model = MLP(x.shape[1], y.shape[1], width=cfg.width, depth=2, activation="tanh").double()
    w0 = _flat(model)
    eta, thr = cfg.lr, 2.0 / cfg.lr

    # gradient descent
    gd_w, gd_loss, gd_sharp = {}, [], {}
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    v0 = None

    def record(step: int) -> torch.Tensor:
        """The full-batch loss at ``step`` (graph attached), with GD's weights and sharpness every eval_every."""
        nonlocal v0
        loss = mse(model(x), y)
        gd_loss.append(float(loss.detach()))
        if step % cfg.eval_every == 0:
            gd_w[step] = _flat(model)
            res = sharpness(model, mse, (x, y), k=1, tol=cfg.lanczos_tol, v0=v0, seed=seed)
            v0 = res.eigenvectors[:, 0]
            gd_sharp[step] = res.top
        return loss

    # logged with the flows below, once they exist: the loop evaluates nothing on its own
    train(run, TrainingLoop(model, opt, cfg.steps, cfg.eval_every, record, no_evaluation, watch="", eval_at=never,
                            probes=cfg.probes, probe_batch=(x, y), probe_loss=mse, probe_prefix="gd/"))
    record(cfg.steps)

    # central flow and gradient flow: Euler steps of cf_dt GD steps
    flows = {}
    for name, central in (("cf", True), ("gf", False)):
        _set_flat(model, w0)
        w = w0.clone()
        v0, out = None, {}
        n_sub = int(round(cfg.eval_every / cfg.cf_dt))
        dt = cfg.eval_every / n_sub
        for k in range(cfg.steps // cfg.eval_every + 1):
            for sub in range(n_sub if k > 0 else 0):
                res = sharpness(model, mse, (x, y), k=1, tol=cfg.lanczos_tol, v0=v0, seed=seed) if central else None
                if central:
                    v0 = res.eigenvectors[:, 0]
                    loss, g, s, gs = _grad_and_sharpness_grad(model, x, y, v0.double())
                    s_next = s - eta * dt * float(gs @ g)
                    sigma2 = max(0.0, 2.0 * (s_next - thr) / (eta * dt * float(gs @ gs)))
                    w = w - eta * dt * (g + 0.5 * sigma2 * gs)
                else:
                    loss = mse(model(x), y)
                    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
                    w = w - eta * dt * g
                _set_flat(model, w)
            step = k * cfg.eval_every
            res = sharpness(model, mse, (x, y), k=1, tol=cfg.lanczos_tol, v0=v0, seed=seed)
            v0 = res.eigenvectors[:, 0]
            with torch.no_grad():
                loss_now = float(mse(model(x), y))
            sigma2_now = 0.0
            if central:
                _, g, s, gs = _grad_and_sharpness_grad(model, x, y, v0.double())
                s_next = s - eta * dt * float(gs @ g)
                sigma2_now = max(0.0, 2.0 * (s_next - thr) / (eta * dt * float(gs @ gs)))
            out[step] = {"w": w.clone(), "loss": loss_now, "sharpness": res.top, "sigma2": sigma2_now,
                         "predicted_loss": loss_now + 0.5 * sigma2_now * res.top}
        flows[name] = out

    steps = sorted(gd_w)
    half = cfg.window // 2
    smooth = {s: sum(gd_loss[max(0, s - half): s + half + 1]) / len(gd_loss[max(0, s - half): s + half + 1])
              for s in steps}
    for s in steps:
        cf, gf = flows["cf"][s], flows["gf"][s]
        run.log(s, gd_loss=gd_loss[s], gd_smoothed_loss=smooth[s], gd_sharpness=gd_sharp[s],
                cf_loss=cf["loss"], cf_predicted_loss=cf["predicted_loss"], cf_sharpness=cf["sharpness"],
                cf_sigma2=cf["sigma2"], gf_loss=gf["loss"], gf_sharpness=gf["sharpness"],
                gd_to_cf=float(torch.linalg.norm(gd_w[s] - cf["w"])),
                gd_to_gf=float(torch.linalg.norm(gd_w[s] - gf["w"])))
    edge = next((s for s in steps if gd_sharp[s] >= thr), None)
    result: dict = {"threshold": thr, "edge_step": edge}
    if edge is not None:
        win = [s for s in steps if s >= edge + 5 * cfg.eval_every and s + half < len(gd_loss)]
        cf_edge = [s for s in win if flows["cf"][s]["sigma2"] > 0]
        if win:
            rel = sorted(abs(smooth[s] - flows["cf"][s]["predicted_loss"]) / smooth[s] for s in win)
            ratio = sorted(float(torch.linalg.norm(gd_w[s] - flows["cf"][s]["w"])
                                 / max(float(torch.linalg.norm(gd_w[s] - flows["gf"][s]["w"])), 1e-300)) for s in win)
            result.update({
                "window_steps": [win[0], win[-1]],
                "cf_sharpness_max_rel": max(abs(flows["cf"][s]["sharpness"] - thr) / thr for s in cf_edge) if cf_edge else None,
                "cf_edge_points": len(cf_edge),
                "gd_sharpness_mean": sum(gd_sharp[s] for s in win) / len(win),
                "cf_sharpness_mean": sum(flows["cf"][s]["sharpness"] for s in win) / len(win),
                "loss_median_rel_error": rel[len(rel) // 2],
                "gf_loss_median_rel_error": sorted(abs(smooth[s] - flows["gf"][s]["loss"]) / smooth[s] for s in win)[len(win) // 2],
                "distance_ratio_median": ratio[len(ratio) // 2],
            })
    _save_figure(run, cfg)
    return result


def check(result: dict) -> list[CheckRow]:
    if result.get("window_steps") is None:
        return [CheckRow("GD reached the edge (sharpness >= 2/eta)", "yes", "no", "exact", False)]
    nan = float("nan")
    cf_max = result.get("cf_sharpness_max_rel")
    return [
        CheckRow.at_most("central flow: max |S - 2/eta| / (2/eta) at the edge", CF_SHARPNESS_TOL, cf_max),
        CheckRow.relative("GD mean sharpness vs central flow's (window)", result["cf_sharpness_mean"],
                          result.get("gd_sharpness_mean", nan), GD_SHARPNESS_TOL),
        CheckRow.at_most("GD smoothed loss vs central-flow predicted loss: median rel. error", LOSS_TOL,
                         result["loss_median_rel_error"]),
        CheckRow.at_most("median |w_GD - w_CF| / |w_GD - w_GF|", DISTANCE_RATIO, result["distance_ratio_median"]),
    ]


def _save_figure(run, cfg: CentralFlowsConfig) -> None:
    from lmech.plotting import plt

    df = run.metrics(wide=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(df["step"], df["gd_loss"], color="0.7", lw=0.8, label="GD")
    ax.plot(df["step"], df["gd_smoothed_loss"], color="C0", label=f"GD, smoothed ({cfg.window} steps)")
    ax.plot(df["step"], df["cf_predicted_loss"], "k--", label="central flow: L + sigma^2 S / 2")
    ax.plot(df["step"], df["gf_loss"], color="C3", ls=":", label="gradient flow")
    ax.set(yscale="log", xlabel="step", ylabel="train loss", title="loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(df["step"], df["gd_sharpness"], color="C0", label="GD")
    ax.plot(df["step"], df["cf_sharpness"], "k--", label="central flow")
    ax.plot(df["step"], df["gf_sharpness"], color="C3", ls=":", label="gradient flow")
    ax.axhline(2.0 / cfg.lr, color="0.5", lw=0.8)
    ax.set(xlabel="step", ylabel="sharpness", title=f"sharpness (2/eta = {2 / cfg.lr:g})")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(df["step"], df["gd_to_cf"], "k--", label="|w_GD - w_CF|")
    ax.plot(df["step"], df["gd_to_gf"], color="C3", ls=":", label="|w_GD - w_GF|")
    ax.set(xlabel="step", ylabel="distance in weight space", title="which flow GD follows")
    ax.legend(fontsize=8)
    fig.suptitle(f"Central flow vs GD: tanh MLP (no LayerNorm), MNIST-1D n={cfg.n_train}, lr={cfg.lr:g}")
    fig.tight_layout()
    run.save_figure(fig, "central-flows")


EXPERIMENT = Experiment(
    name="central-flows",
    summary="GD at the edge of stability vs the central-flow ODE: sharpness 2/eta, smoothed loss, trajectory",
    config=CentralFlowsConfig,
    run=run,
    check=check,
    quick={"steps": 600},
)
