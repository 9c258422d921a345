r"""A physics-informed network for 1-D advection with a noisy initial condition.

Problem (Krishnapriyan et al. 2021, *Characterizing possible failure modes in physics-informed
neural networks*; the generalization paper's PINN experiment uses :math:`\beta = 5`):

.. math:: u_t + \beta u_x = 0, \quad x \in [0, 2\pi),\ t \in [0, 1], \quad u(x, 0) = \sin x,
          \quad u(0, t) = u(2\pi, t),

with exact solution :math:`u(x, t) = \sin(x - \beta t)`. The network only sees the initial
condition through ``n_ic`` noisy samples :math:`u_0(x_i) = \sin x_i + \sigma\xi_i` (uniform grid,
:math:`\xi_i \sim N(0, 1)` drawn once per seed).

Loss (each term a plain mean of squares; ``u`` = the network :math:`(x, t) \mapsto u`):

.. math:: L = \underbrace{\tfrac1{b}\textstyle\sum_j (u_t + \beta u_x)^2(x_j, t_j)}_{\text{residual}}
          + \underbrace{\tfrac1{n_{ic}}\textstyle\sum_i (u(x_i, 0) - u_0(x_i))^2}_{\text{initial}}
          + \underbrace{\tfrac1{n_{bc}}\textstyle\sum_k (u(0, t_k) - u(2\pi, t_k))^2}_{\text{periodic}}

The residual uses a minibatch of ``batch_size`` points drawn each step from a fixed pool of
``n_collocation`` uniform random collocation points (so ``alpha=finite`` means
``batch_size / (n_collocation - batch_size)``); the ``n_bc`` boundary times are redrawn each
step; derivatives come from autograd with respect to the inputs. Inputs are scaled to
:math:`[-1, 1]` before the network (``x/\pi - 1``, ``2t - 1``).

Logged every ``eval_every`` steps: the loss terms on the current batch and ``rel_l2``
:math:`= \|u - u^*\|_2 / \|u^*\|_2` on a 128 x 65 grid of :math:`[0, 2\pi) \times [0, 1]` against
the exact (clean) solution. Result: ``step_to_target``, the first evaluated step with
``rel_l2 <= target_rel_l2`` (0.40, the paper's threshold; ``None`` if never), ``min_rel_l2`` and
``final_rel_l2``. Check: the target is reached.

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`): ``gate``, ``evidence`` and
``train_loss`` read :func:`lmech.stopping.gradient_signals` on the noisy initial-condition fit
(:class:`InitialCondition`, ``n_ic`` examples, mean squared error): the only supervised term, and
the one whose noise the network can memorize. Training ends at the evaluation where the rule fires;
the result adds ``stop/rule``, ``stop/step`` and ``stop/best_step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, train
from lmech.experiments.optimizer_keys import (OptimizerKeys, optimizer_diagnostics, optimizer_options,
                                              validate_optimizer_keys)
from lmech.experiments.stopping_keys import GRADIENT_RULES, StoppingKeys, stopping_driver, validate_stopping_keys
from lmech.models import MLP
from lmech.optim import build_optimizer
from lmech.train import minibatches, weight_norm

TWO_PI = 2 * math.pi


@dataclass
class PINNAdvectionConfig(StoppingKeys, OptimizerKeys):
    beta: float = 5.0
    noise_std: float = 0.2
    n_ic: int = 128
    n_bc: int = 64
    n_collocation: int = 4096
    batch_size: int = 512
    width: int = 50
    depth: int = 4
    activation: Literal["tanh", "gelu", "silu"] = "tanh"
    steps: int = 4000
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eval_every: int = 50
    # instruments: none, or a lmech.Monitor preset (economy, full) measured every eval_every steps
    probes: ProbeLevel = "none"
    target_rel_l2: float = 0.40
    stop_at_target: bool = False

    def validate(self) -> None:
        require(self.beta > 0, f"beta must be positive, got {self.beta}")
        require(self.noise_std >= 0, f"noise_std must be >= 0, got {self.noise_std}")
        require(self.n_ic >= 2 and self.n_bc >= 1 and self.n_collocation >= 2,
                "n_ic must be >= 2, n_bc >= 1 and n_collocation >= 2")
        require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        require(self.width > 0 and self.depth > 0, "width and depth must be positive")
        require(self.steps > 0 and self.eval_every > 0, "steps and eval_every must be positive")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        require(self.target_rel_l2 > 0, f"target_rel_l2 must be positive, got {self.target_rel_l2}")
        validate_optimizer_keys(self, min(self.batch_size, self.n_collocation), self.n_collocation)
        validate_stopping_keys(self, ("none", *GRADIENT_RULES), self.n_ic,
                               "the path rules follow a supervised fit of a training set; the PINN loss is mostly a "
                               "physics residual")


class PINN(nn.Module):
    """``(x, t) -> u``: inputs scaled to [-1, 1], then an MLP with one output."""

    def __init__(self, width: int, depth: int, activation: str):
        super().__init__()
        self.mlp = MLP(d_in=2, d_out=1, width=width, depth=depth, activation=activation)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mlp(torch.stack([x / math.pi - 1, 2 * t - 1], dim=-1))[..., 0]


class InitialCondition(nn.Module):
    """``x -> u(x, 0)``: the PINN's initial-condition fit as a one-input model (parameters shared),
    the supervised part of the loss that the stopping rules' gradient signals are measured on."""

    def __init__(self, pinn: PINN):
        super().__init__()
        self.pinn = pinn

    def forward(self, x: Tensor) -> Tensor:
        return self.pinn(x, torch.zeros_like(x))


def exact(x: Tensor, t: Tensor, beta: float) -> Tensor:
    """u*(x, t) = sin(x - beta t)."""
    return torch.sin(x - beta * t)


def residual(model: PINN, x: Tensor, t: Tensor, beta: float) -> Tensor:
    """u_t + beta u_x at the points (x, t) (each output depends on its own input only)."""
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    u = model(x, t)
    u_x, u_t = torch.autograd.grad(u.sum(), (x, t), create_graph=True)
    return u_t + beta * u_x


def run(cfg: PINNAdvectionConfig, run, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x_ic = torch.arange(cfg.n_ic, dtype=torch.float32) * (TWO_PI / cfg.n_ic)
    u0 = torch.sin(x_ic) + cfg.noise_std * torch.randn(cfg.n_ic, generator=gen)
    pool_x = TWO_PI * torch.rand(cfg.n_collocation, generator=gen)
    pool_t = torch.rand(cfg.n_collocation, generator=gen)
    gx, gt = torch.meshgrid(torch.arange(128) * (TWO_PI / 128), torch.linspace(0, 1, 65), indexing="ij")
    u_star = exact(gx, gt, cfg.beta)
    torch.manual_seed(seed)
    model = PINN(cfg.width, cfg.depth, cfg.activation)
    batch = min(cfg.batch_size, cfg.n_collocation)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), **optimizer_options(cfg, batch, cfg.n_collocation))
    batches = minibatches(cfg.n_collocation, cfg.batch_size, gen)
    zeros_ic = torch.zeros(cfg.n_ic)

    state = {"step_to_target": None, "best": math.inf}
    terms: dict = {}  # the loss terms of the last step, logged with the next evaluation

    def evaluate(step: int) -> dict:
        with torch.no_grad():
            return dict(rel_l2=float((model(gx, gt) - u_star).norm() / u_star.norm()), **terms)

    def on_eval(step: int, evals: dict) -> bool:
        state["best"] = min(state["best"], evals["rel_l2"])
        if state["step_to_target"] is None and evals["rel_l2"] <= cfg.target_rel_l2:
            state["step_to_target"] = step
            return cfg.stop_at_target
        return False

    def loss(step: int) -> torch.Tensor:
        idx = next(batches)
        t_bc = torch.rand(cfg.n_bc, generator=gen)
        loss_res = residual(model, pool_x[idx], pool_t[idx], cfg.beta).square().mean()
        loss_ic = (model(x_ic, zeros_ic) - u0).square().mean()
        loss_bc = (model(torch.zeros(cfg.n_bc), t_bc) - model(torch.full((cfg.n_bc,), TWO_PI), t_bc)).square().mean()
        total = loss_res + loss_ic + loss_bc
        terms.update(loss=float(total.detach()), loss_residual=float(loss_res.detach()),
                     loss_ic=float(loss_ic.detach()), loss_bc=float(loss_bc.detach()))
        return total

    loop = TrainingLoop(model, optimizer, cfg.steps, cfg.eval_every, loss, evaluate, watch="rel_l2",
                        extras=lambda: dict(weight_norm=weight_norm(model), **optimizer_diagnostics(optimizer)),
                        on_eval=on_eval, probes=cfg.probes,
                        probe_batch=((x_ic, zeros_ic), u0),  # the initial condition: a supervised fit
                        probe_loss=torch.nn.functional.mse_loss,
                        stopping=stopping_driver(cfg, InitialCondition(model), torch.nn.functional.mse_loss,
                                                 (x_ic, u0)))
    rel = train(run, loop)["rel_l2"]
    step, step_to_target, best = loop.stopped_at, state["step_to_target"], state["best"]

    with torch.no_grad():
        u = model(gx, gt)
        u_fit0 = model(x_ic, zeros_ic)
    _save_figure(run, cfg, gx, gt, u, u_star, x_ic, u0, u_fit0, step_to_target)
    return {"step_to_target": step_to_target, "min_rel_l2": best, "final_rel_l2": rel, "steps_run": step,
            "n_params": sum(p.numel() for p in model.parameters()), **loop.stop_result()}


def check(result: dict) -> list[CheckRow]:
    """The relative L2 error reaches the paper's threshold within the step budget."""
    return [CheckRow.at_most("best relative L2 error", 0.40, result.get("min_rel_l2"))]


def _save_figure(run, cfg, gx, gt, u, u_star, x_ic, u0, u_fit0, step_to_target) -> None:
    from lmech.plotting import plt

    df = run.metrics(wide=True)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    ax.plot(df["step"], df["rel_l2"], color="tab:red")
    ax.axhline(cfg.target_rel_l2, color="gray", ls=":")
    if step_to_target is not None:
        ax.axvline(step_to_target, color="gray", ls=":")
    ax.set(yscale="log", xlabel="step", ylabel="relative L2", title="error to the exact solution")
    ax.grid(alpha=0.3)
    extent = (0, 1, 0, TWO_PI)
    for ax, img, title in ((axes[1], u, "PINN u(x, t)"), (axes[2], u_star, "exact sin(x - beta t)")):
        img = torch.as_tensor(img).detach().cpu().numpy()  # matplotlib wants arrays
        ax.imshow(img, origin="lower", aspect="auto", extent=extent, cmap="RdBu_r", vmin=-1.1, vmax=1.1)
        ax.set(xlabel="t", ylabel="x", title=title)
    ax = axes[3]
    clean = torch.sin(x_ic)
    x_ic, u0, clean, u_fit0 = (torch.as_tensor(t).detach().cpu().numpy() for t in (x_ic, u0, clean, u_fit0))
    ax.plot(x_ic, u0, ".", ms=3, color="gray", label="noisy u(x, 0)")
    ax.plot(x_ic, clean, color="black", lw=1, label="clean")
    ax.plot(x_ic, u_fit0, color="tab:red", lw=1, label="PINN")
    ax.set(xlabel="x", title="initial condition")
    ax.legend(fontsize=8)
    fig.suptitle(f"advection beta={cfg.beta}, IC noise {cfg.noise_std}, {cfg.optimizer}"
                 + (f" (gate {cfg.gate}, alpha {cfg.alpha})" if cfg.optimizer == "poprisk" else ""))
    fig.tight_layout()
    run.save_figure(fig, "pinn")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="pinn-advection",
    summary="PINN for u_t + 5 u_x = 0 from a noisy initial condition: steps to relative L2 <= 0.40",
    config=PINNAdvectionConfig,
    run=run,
    check=check,
    quick={"steps": 600, "n_collocation": 1024, "batch_size": 256, "width": 32, "eval_every": 25},
)
