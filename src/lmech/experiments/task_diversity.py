r"""The task-diversity transition of in-context learning (Raventós, Paul, Chen & Ganguli,
*Pretraining task diversity and the emergence of non-Bayesian in-context learning for
regression*, NeurIPS 2023): a transformer pretrained on prompts whose tasks come from a pool of
``M`` fixed vectors behaves, with few tasks, like the Bayes-optimal estimator for *that* discrete
prior (dMMSE: it memorizes the pool and fails on new tasks), and with many tasks like ridge, the
Bayes-optimal estimator for the Gaussian prior (it learns to regress, also on new tasks).

Setting: the ``in-context`` entry's prompts and transformer (:mod:`lmech.experiments.in_context`,
:mod:`lmech.theory.in_context`), one training per pool size in ``pools`` (pools drawn from
:math:`\mathcal N(0, I_d/d)`), evaluated on ``eval_prompts`` prompts with *fresh* tasks against
ridge and the pool's dMMSE on the same prompts.

Checks, with :math:`D_{\rm dMMSE}` and :math:`D_{\rm ridge}` the mean absolute difference (over
:math:`k = 1..K-1`) between the transformer's error and each estimator's:

* smallest pool: :math:`D_{\rm dMMSE}/D_{\rm ridge} \le 1` (closer to dMMSE);
* largest pool: :math:`D_{\rm dMMSE}/D_{\rm ridge} \ge 1` (closer to ridge).

This entry tests a claim about training on CPU budgets far below the paper's (it is not among the
default laws); a failing row is a result (docs/results/verify.md). ``quick``: fewer steps.

Every pool's transformer trains on in-context's :func:`~lmech.experiments.in_context.train_transformer`
(the catalog's training loop; ``probes=economy|full``: a Monitor every 50 steps, columns
``M<pool>/probe/...``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmech.experiments._laws import parse_list
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.in_context import train_transformer, transformer_errors
from lmech.experiments.loop import ProbeLevel
from lmech.theory import in_context as ic


@dataclass
class TaskDiversityConfig:
    pools: str = "4,1024"       # pool sizes M (comma-separated), one pretraining run each
    d: int = 3                  # input dimension
    pairs: int = 10             # (x, y) pairs per prompt
    noise: float = 0.25         # label noise standard deviation
    width: int = 32             # transformer width
    layers: int = 2             # transformer blocks
    heads: int = 4              # attention heads
    steps: int = 4000           # training steps per pool
    batch: int = 256            # prompts per step
    lr: float = 3e-3            # Adam peak learning rate (100 warm-up steps, cosine decay)
    eval_prompts: int = 4000    # fresh-task prompts for the evaluation
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) every 50 steps

    def validate(self) -> None:
        pools = parse_list(self.pools, int, "pools")
        require(len(pools) >= 2 and all(m >= 1 for m in pools), f"pools needs >= 2 positive sizes, got {self.pools!r}")
        require(self.pairs > self.d + 1 and self.noise > 0, "need pairs > d + 1 and noise > 0")
        require(self.width % self.heads == 0, f"width ({self.width}) must be divisible by heads ({self.heads})")
        require(self.steps > 100 and self.batch >= 1 and self.eval_prompts >= 1 and self.lr > 0,
                "steps > 100, batch, eval_prompts and lr positive")


def run(cfg: TaskDiversityConfig, run, seed: int) -> dict:
    pools = sorted(parse_list(cfg.pools, int, "pools"))
    eval_gen = torch.Generator().manual_seed(seed + 10_000)
    x, y, _ = ic.sample_prompts(cfg.eval_prompts, cfg.pairs, cfg.d, cfg.noise, eval_gen)
    ridge = ic.ridge_errors(x, y, cfg.noise).mean(0)
    result: dict = {"pools": pools, "ridge": ridge.tolist()}
    for m in pools:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + m)
        pool = ic.sample_tasks(m, cfg.d, gen)
        model = train_transformer(cfg, gen, pool, run, prefix=f"M{m}/", probes=cfg.probes)
        err = transformer_errors(model, x, y)
        dmmse = ic.dmmse_errors(x, y, pool, cfg.noise).mean(0)
        d_dmmse = float((err[1:] - dmmse[1:]).abs().mean())
        d_ridge = float((err[1:] - ridge[1:]).abs().mean())
        result.update({f"M{m}.transformer": err.tolist(), f"M{m}.dmmse": dmmse.tolist(),
                       f"M{m}.distance_dmmse": d_dmmse, f"M{m}.distance_ridge": d_ridge,
                       f"M{m}.ratio": d_dmmse / max(d_ridge, 1e-12)})
    _save_figure(run, cfg, result)
    return result


def check(result: dict) -> list[CheckRow]:
    small, large = result["pools"][0], result["pools"][-1]
    return [
        CheckRow.at_most(f"M={small} tasks: distance to dMMSE / distance to ridge (fresh tasks)", 1.0,
                         result[f"M{small}.ratio"]),
        CheckRow.at_least(f"M={large} tasks: distance to dMMSE / distance to ridge (fresh tasks)", 1.0,
                          result[f"M{large}.ratio"]),
    ]


def _save_figure(run, cfg: TaskDiversityConfig, result: dict) -> None:
    from lmech.plotting import plt

    pools = result["pools"]
    fig, axes = plt.subplots(1, len(pools), figsize=(5 * len(pools), 4), squeeze=False)
    k = list(range(cfg.pairs))
    for j, m in enumerate(pools):
        ax = axes[0, j]
        ax.plot(k, result[f"M{m}.transformer"], "o-", label="transformer")
        ax.plot(k, result["ridge"], "k--", label="ridge")
        ax.plot(k, result[f"M{m}.dmmse"], ":", color="C3", label=f"dMMSE (pool of {m})")
        ax.set(title=f"pretrained on M = {m} tasks; fresh tasks", xlabel="in-context examples k",
               ylabel="squared error / Var(w.x)", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "task-diversity")


EXPERIMENT = Experiment(
    name="task-diversity",
    summary="in-context regression vs pretraining task count: few tasks -> dMMSE (memorize), many -> ridge",
    config=TaskDiversityConfig,
    run=run,
    check=check,
    quick={"steps": 1200, "eval_prompts": 2000},
)
