r"""In-context learning of linear regression: a small transformer trained on prompts of
:math:`(x, w^\top x)` pairs for random :math:`w` regresses in context like the Bayes-optimal
ridge predictor (Garg, Tsipras, Liang & Valiant 2022), and a one-layer linear self-attention
trained on the same prompts implements one step of gradient descent with the optimal step size
(von Oswald et al. 2023; Ahn et al. 2023; Zhang, Frei & Bartlett 2023).

Prompts, predictors and closed forms: :mod:`lmech.theory.in_context` (tasks
:math:`w \sim \mathcal N(0, I_d/d)`, inputs :math:`\mathcal N(0, I_d)`, label noise ``noise``;
errors in units of :math:`\mathrm{Var}(w^\top x) = 1`).

Part 1, transformer (:class:`lmech.models.in_context.InContextTransformer`: ``layers`` pre-LN
blocks of width ``width`` on the tokens :math:`x_1, y_1, x_2, \ldots`; Adam at ``lr`` with 100
warm-up steps and cosine decay, ``steps`` steps of ``batch`` fresh prompts of ``pairs`` pairs,
loss the mean squared error of every prediction :math:`\hat y_k`, :math:`k = 0..K-1`). Evaluated
on ``eval_prompts`` fresh prompts against ridge and least squares on the same prompts. Checks:

* the transformer's error, averaged over :math:`k = 1..K-1`, exceeds ridge's by at most
  ``EXCESS_BOUND`` = 0.1 (ridge is optimal, so the excess is :math:`\ge 0` up to sampling);
* at :math:`k = d` (the least-squares noise peak, where ridge stays low) the transformer beats
  least squares (it regularizes like ridge, it does not interpolate);
* its error at the last position is below half its error at :math:`k = 1` (it uses the context).

Part 2, linear self-attention (:class:`lmech.models.in_context.LinearSelfAttention`, full
:math:`W_{KQ}, W_{PV}` from a small random init, Adam, ``lsa_steps`` steps of ``lsa_batch`` prompts
of ``lsa_n`` examples and one query). Checks: the learned
:math:`A = (W_{PV})_{d+1,d+1}(W_{KQ})_{1:d,1:d}` equals :math:`\eta^* I` (relative Frobenius
error at most 5%), and its held-out error equals the closed form :math:`\mathcal E(\eta^*)`
(within 3%; the Monte Carlo error of ``lsa_eval_prompts`` = 50,000 prompts is about 0.6%; with 4,000
it was 2.2%, and a 4,000-prompt run landed 3.4% off while 10^6 prompts of one GD step at
:math:`\eta^*` agreed with the closed form to 0.1%).

Tolerances were set from prototype runs before the recorded runs (docs/results/verify.md says
which). The task-diversity transition is the separate entry ``task-diversity``
(:mod:`lmech.experiments.task_diversity`). ``quick``: fewer steps and evaluation prompts.

Both parts train on :class:`lmech.experiments.loop.TrainingLoop` (minibatch loss logged every 50
steps); ``probes=economy|full`` attaches a Monitor to each, every 50 steps, on 256 prompts of a
generator of their own (columns ``probe/...`` and ``lsa/probe/...``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import (ProbeLevel, TrainingLoop, log_minibatch_loss, never, no_evaluation,
                                    train)
from lmech.models.in_context import InContextTransformer, LinearSelfAttention
from lmech.theory import in_context as ic

EXCESS_BOUND = 0.1      # mean over k of (transformer - ridge) error, units of Var(w.x)
LSA_A_TOLERANCE = 0.05  # relative Frobenius error of A vs eta* I
LSA_LOSS_TOLERANCE = 0.03
PROBE_SEED = 20_000     # the Monitor's probe prompts come from a generator of their own


@dataclass
class InContextConfig:
    d: int = 3                  # input dimension
    pairs: int = 10             # (x, y) pairs per prompt, K
    noise: float = 0.25         # label noise standard deviation sigma
    width: int = 32             # transformer width
    layers: int = 2             # transformer blocks
    heads: int = 4              # attention heads
    steps: int = 4000           # transformer training steps
    batch: int = 256            # prompts per step
    lr: float = 3e-3            # Adam peak learning rate (100 warm-up steps, cosine decay)
    eval_prompts: int = 4000    # fresh prompts for the evaluation
    lsa_n: int = 20             # in-context examples for the linear self-attention part
    lsa_steps: int = 3000       # its Adam steps
    lsa_batch: int = 512        # its prompts per step
    lsa_lr: float = 1e-2        # its learning rate
    lsa_eval_prompts: int = 50_000  # held-out prompts for its error (Monte Carlo error about 0.6%)
    probes: ProbeLevel = "none"     # instruments: none, or a lmech.Monitor preset (economy, full) every 50 steps

    def validate(self) -> None:
        require(self.d >= 1 and self.pairs > self.d + 1, f"need d >= 1 and pairs > d + 1, got d={self.d}, pairs={self.pairs}")
        require(self.noise > 0, "noise must be positive (ridge's regularization is noise^2 d)")
        require(self.width % self.heads == 0, f"width ({self.width}) must be divisible by heads ({self.heads})")
        require(min(self.layers, self.steps, self.batch, self.eval_prompts) >= 1, "sizes must be positive")
        require(self.steps > 100, "steps must exceed the 100 warm-up steps")
        require(self.lr > 0 and self.lsa_lr > 0, "learning rates must be positive")
        require(min(self.lsa_n, self.lsa_steps, self.lsa_batch, self.lsa_eval_prompts) >= 1, "lsa sizes must be positive")


def schedule(step: int, steps: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 0 at ``steps``."""
    return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_transformer(cfg, gen: torch.Generator, pool: torch.Tensor | None, run=None, prefix: str = "",
                      probes: ProbeLevel = "none") -> InContextTransformer:
    """Train an :class:`InContextTransformer` on prompts (fresh tasks, or drawn from ``pool``);
    ``probes`` attaches a Monitor (columns ``<prefix>probe/...``) on 256 prompts of its own."""
    model = InContextTransformer(cfg.d, cfg.pairs, cfg.width, cfg.layers, cfg.heads)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, cfg.steps))

    def loss(step: int) -> torch.Tensor:
        x, y, _ = ic.sample_prompts(cfg.batch, cfg.pairs, cfg.d, cfg.noise, gen, pool)
        return ((model(x, y) - y) ** 2).mean()

    x, y, _ = ic.sample_prompts(256, cfg.pairs, cfg.d, cfg.noise, torch.Generator().manual_seed(PROBE_SEED), pool)
    on_step = None if run is None else log_minibatch_loss(f"{prefix}train_loss", 50, cfg.steps)
    train(run, TrainingLoop(model, opt, cfg.steps, 50, loss, no_evaluation, watch="", eval_at=never,
                            scheduler=sched, on_step=on_step, probes=probes, probe_batch=((x, y), y),
                            probe_loss=F.mse_loss, probe_prefix=prefix))
    return model


def transformer_errors(model: InContextTransformer, x, y) -> torch.Tensor:
    """Mean squared error per number of in-context examples, ``(K,)``."""
    with torch.no_grad():
        return ((model(x, y).double() - y.double()) ** 2).mean(0)


def train_lsa(cfg: InContextConfig, gen: torch.Generator, run=None, probes: ProbeLevel = "none") -> LinearSelfAttention:
    model = LinearSelfAttention(cfg.d)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lsa_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, cfg.lsa_steps))

    def loss(step: int) -> torch.Tensor:
        x, y, _ = ic.sample_prompts(cfg.lsa_batch, cfg.lsa_n + 1, cfg.d, cfg.noise, gen)
        return ((model(x[:, :-1], y[:, :-1], x[:, -1]) - y[:, -1]) ** 2).mean()

    x, y, _ = ic.sample_prompts(256, cfg.lsa_n + 1, cfg.d, cfg.noise, torch.Generator().manual_seed(PROBE_SEED))
    on_step = None if run is None else log_minibatch_loss("lsa_train_loss", 50, cfg.lsa_steps)
    train(run, TrainingLoop(model, opt, cfg.lsa_steps, 50, loss, no_evaluation, watch="", eval_at=never,
                            scheduler=sched, on_step=on_step, probes=probes,
                            probe_batch=((x[:, :-1], y[:, :-1], x[:, -1]), y[:, -1]), probe_loss=F.mse_loss,
                            probe_prefix="lsa/"))
    return model


def run(cfg: InContextConfig, run, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = train_transformer(cfg, gen, None, run, probes=cfg.probes)
    eval_gen = torch.Generator().manual_seed(seed + 10_000)
    x, y, _ = ic.sample_prompts(cfg.eval_prompts, cfg.pairs, cfg.d, cfg.noise, eval_gen)
    err = transformer_errors(model, x, y)
    ridge = ic.ridge_errors(x, y, cfg.noise).mean(0)
    ls = ic.least_squares_errors(x, y).mean(0)
    result: dict = {"d": cfg.d, "pairs": cfg.pairs,
                    "transformer": err.tolist(), "ridge": ridge.tolist(), "least_squares": ls.tolist(),
                    "excess_over_ridge": float((err[1:] - ridge[1:]).mean())}

    lsa = train_lsa(cfg, gen, run, probes=cfg.probes)
    eta = ic.gd_step_lr(cfg.lsa_n, cfg.d, cfg.noise)
    a = lsa.effective_lr().detach().double()
    xq, yq, _ = ic.sample_prompts(cfg.lsa_eval_prompts, cfg.lsa_n + 1, cfg.d, cfg.noise, eval_gen)
    with torch.no_grad():
        lsa_err = float(((lsa(xq[:, :-1], yq[:, :-1], xq[:, -1]) - yq[:, -1]) ** 2).mean())
    eye = torch.eye(cfg.d, dtype=torch.float64)
    result.update({"lsa.eta_star": eta, "lsa.A": a.tolist(),
                   "lsa.A_rel_error": float(torch.linalg.norm(a - eta * eye) / torch.linalg.norm(eta * eye)),
                   "lsa.error": lsa_err, "lsa.error_predicted": ic.gd_step_error(eta, cfg.lsa_n, cfg.d, cfg.noise),
                   "lsa.mean_diag_A": float(torch.diagonal(a).mean())})
    _save_figure(run, cfg, result)
    return result


def check(result: dict) -> list[CheckRow]:
    d = result["d"]
    err, ridge, ls = result["transformer"], result["ridge"], result["least_squares"]
    return [
        CheckRow.at_most("transformer error - ridge error, mean over k = 1..K-1", EXCESS_BOUND,
                         result["excess_over_ridge"]),
        CheckRow.at_most(f"at k = d = {d}: transformer error / least-squares error", 1.0, err[d] / ls[d]),
        CheckRow.at_most("transformer error at k = K-1 / at k = 1 (uses the context)", 0.5, err[-1] / err[1]),
        CheckRow.relative("linear self-attention: mean diagonal of A vs one-step GD eta*", result["lsa.eta_star"],
                          result["lsa.mean_diag_A"], LSA_A_TOLERANCE),
        CheckRow.at_most("linear self-attention: |A - eta* I|_F / |eta* I|_F", LSA_A_TOLERANCE, result["lsa.A_rel_error"]),
        CheckRow.relative("linear self-attention: held-out error vs closed form E(eta*)", result["lsa.error_predicted"],
                          result["lsa.error"], LSA_LOSS_TOLERANCE),
    ]


def _save_figure(run, cfg: InContextConfig, result: dict) -> None:
    from lmech.plotting import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    k = list(range(cfg.pairs))
    ax.plot(k, result["transformer"], "o-", label="transformer")
    ax.plot(k, result["ridge"], "k--", label="ridge (Bayes-optimal)")
    ax.plot(k, result["least_squares"], ":", color="C3", label="least squares")
    ax.axvline(cfg.d, color="0.7", lw=0.8)
    ax.set(xlabel="in-context examples k", ylabel="squared error / Var(w.x)", yscale="log",
           ylim=(0.5 * min(result["ridge"][1:]), 2.0), title=f"in-context regression, d={cfg.d}, noise={cfg.noise:g}")
    ax.legend(fontsize=8)
    ax = axes[1]
    a = torch.tensor(result["lsa.A"])
    im = ax.imshow(a.numpy(), cmap="RdBu_r", vmin=-1.2 * result["lsa.eta_star"], vmax=1.2 * result["lsa.eta_star"])
    fig.colorbar(im, ax=ax)
    ax.set(title=f"linear self-attention: A (eta* = {result['lsa.eta_star']:.3f})")
    fig.tight_layout()
    run.save_figure(fig, "in-context")


EXPERIMENT = Experiment(
    name="in-context",
    summary="in-context linear regression: a small transformer approaches ridge; linear self-attention = one GD step",
    config=InContextConfig,
    run=run,
    check=check,
    quick={"steps": 1200, "eval_prompts": 2000, "lsa_steps": 800},
)
