r"""The quanta model on multitask sparse parity: sharp per-task transitions whose average is a
smooth power law.

Source: Michaud, Liu, Girit & Tegmark, *The Quantization Model of Neural Scaling* (NeurIPS 2023);
research notes 3.3. Task: :func:`lmech.tasks.sparse_parity` (``n_tasks`` subtasks, each the parity
of its own ``k`` of ``n_bits`` bits, subtask :math:`i` drawn with probability
:math:`p_i \propto i^{-(\alpha+1)}`, ``zipf_exponent`` :math:`= \alpha+1`). A one-hidden-layer ReLU
MLP (``width``) is trained with Adam (``lr``) on fresh batches from the training distribution
(online: the sampler draws task ids with the task's frequencies and random bits, and labels them
with the task's subsets, exactly as :func:`~lmech.tasks.sparse_parity` does); the per-task
cross-entropy (nats) is measured on the task's balanced test set at ``n_eval`` log-spaced steps.

The quanta story: each subtask is a quantum, learned abruptly once the model has seen enough of
*its* examples; learning quantum :math:`i` after :math:`\tau` of its own samples means
:math:`t_i = c/p_i`, and the frequency-weighted mean loss :math:`L(S) = \sum_i p_i \ell_i(S)` is a
sum of shifted steps: :math:`L(S) \approx \ln 2\sum_{i:\,t_i > S} p_i`, a power law
:math:`S^{-\alpha/(\alpha+1)}` when infinitely many quanta remain. With finitely many tasks the
unlearned tail :math:`\sum_{i>n(S)}^{n_{tasks}} p_i` is truncated and the curve is steeper; the
model's prediction for *this* task set is the exponent of :math:`\ln 2\sum_{i:\,c/p_i > S} p_i`
fitted over the same steps as the measurement (``exponent_quanta_model``; :math:`c` is the median of
:math:`t_i p_i` over the learned tasks, a pure time scale).

Measured per task: the transition step :math:`t_i` (loss below :math:`\tfrac12\ln2`) and the
transition width :math:`\ln(t_{i,10\%}/t_{i,90\%})` (from 90% to 10% of :math:`\ln 2`). Checks:

* **sharp**: the median width over learned tasks is at most 2 (a factor :math:`e^2\approx7` in
  steps; the mean loss takes more than an order of magnitude of steps);
* **in frequency order**: Spearman correlation between :math:`p_i` rank and :math:`t_i` at least 0.8;
* **time per quantum**: the slope :math:`\gamma` of :math:`\ln t_i` against :math:`\ln(1/p_i)` within
  30% of the quanta model's 1;
* **smooth power law**: the mean loss from the first transition on (while some task is still
  unlearned) is a straight line on log-log axes, :math:`R^2 \ge 0.97`;
* **the average of the steps is the power law**: the fitted exponent of the mean loss is within
  10% of the exponent of the superposition :math:`\ln 2\sum_i p_i\,\mathbf 1[S < t_i]` of the
  *measured* steps (unlearned tasks count :math:`\ln 2`), fitted over the same steps.

Tolerances and measurements (runs made while writing this; CPU, seed 0). The measured-step
superposition matched the mean-loss exponent within 1.4-9.7% in six configurations, hence 10%.
:math:`\gamma` measured 0.94 (16 tasks, 16 bits, Zipf 1.5, 20k steps), 0.82 (64 tasks, 16 bits,
Zipf 2.0, 30k steps), 0.84 (64 tasks, 12 bits, Zipf 1.5, 30k steps) and 0.79, 1.03, 0.81, 0.77 (32
tasks, Zipf 1.5, 6k steps: 12 bits at lr 1e-3; 10 bits, 12 bits, and 12 bits with width 256 at
lr 3e-3): the later, rarer tasks tend to need fewer of their own samples than the first ones
(plausibly shared parity features), so the constant-:math:`\tau` assumption holds only to about
25%; the 30% tolerance is set from that measured spread, not from a paper number. The same effect
shows in the exponent: the quanta model's own finite-task prediction (``exponent_quanta_model``,
:math:`t_i = c/p_i`) was below the measured exponent by 8%, 20% and 7% in the first three runs and
16% in the default configuration (0.548 vs 0.637). It is reported and drawn, not checked: it
follows from :math:`\gamma` (checked) and the superposition of steps (checked), so a third row
would count the same deviation twice. The infinite-task exponent
:math:`\alpha/(\alpha+1)` (``exponent_infinite_tasks``, drawn in the figure) is not the right
comparison here: with 16-64 tasks and 7-17 of them learned, the truncated tail makes the measured
exponent 0.50-0.64 against 0.33-0.50; no check uses it.

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`): ``gate``, ``evidence`` and
``train_loss`` read :func:`lmech.stopping.gradient_signals` (cross-entropy) on a fixed batch of 512
examples of the training distribution drawn from its own generator (seed + 1), never on the test
set; the rule is fed at the log-spaced evaluations, so ``stop_patience`` counts those. Training ends
at the evaluation where the rule fires; the laws are then fitted on the evaluations up to it and the
result adds ``stop/rule``, ``stop/step`` and ``stop/best_step``.

``quick``: 32 tasks on 12 bits, Zipf exponent 1.5, width 128, learning rate 3e-3, 6000 steps (about
nine quanta learned).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lmech.experiments.laws import first_crossing, loglog_slope
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, train
from lmech.experiments.stopping_keys import GRADIENT_RULES, StoppingKeys, stopping_driver, validate_stopping_keys
from lmech.models import MLP
from lmech.tasks import sparse_parity

LN2 = float(np.log(2.0))
WIDTH_MAX = 2.0
SPEARMAN_MIN = 0.8
GAMMA_TOLERANCE = 0.30
R2_MIN = 0.97
EXPONENT_TOLERANCE = 0.10
STOP_BATCH = 512  # training-distribution examples the stopping rules' gradient signals are measured on


@dataclass
class QuantaConfig(StoppingKeys):
    n_tasks: int = 64
    n_bits: int = 16
    k: int = 3
    zipf_exponent: float = 2.0
    width: int = 256
    lr: float = 1e-3
    batch_size: int = 128
    steps: int = 30000
    n_eval: int = 60
    test_per_task: int = 100
    # instruments: none, or a lmech.Monitor preset (economy, full) measured at about n_eval even steps
    probes: ProbeLevel = "none"

    def validate(self) -> None:
        require(self.n_tasks >= 8, f"n_tasks must be >= 8 (power-law fits need several quanta), got {self.n_tasks}")
        require(1 <= self.k <= self.n_bits, f"k must be in 1..n_bits, got {self.k}")
        require(self.zipf_exponent > 1, f"zipf_exponent (alpha + 1) must be > 1, got {self.zipf_exponent}")
        require(self.width > 0 and self.lr > 0 and self.batch_size > 0, "width, lr, batch_size must be positive")
        require(self.steps >= 100 and self.n_eval >= 10, "steps >= 100 and n_eval >= 10")
        require(self.test_per_task >= 10, "test_per_task must be >= 10")
        validate_stopping_keys(self, ("none", *GRADIENT_RULES), STOP_BATCH,
                               "training draws fresh examples every step: there is no fixed training set for the "
                               "path recorder")


class OnlineSampler:
    """Fresh batches from the multitask sparse-parity training distribution of ``data``."""

    def __init__(self, data, seed: int):
        self.subsets = torch.tensor(data.info["subsets"])
        self.probs = torch.tensor(data.info["frequencies"], dtype=torch.float64)
        self.n_tasks, self.n_bits = data.info["n_tasks"], data.info["n_bits"]
        self.gen = torch.Generator().manual_seed(seed)

    def labels(self, tasks: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return bits.gather(1, self.subsets[tasks]).sum(1) % 2

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = torch.multinomial(self.probs, batch, replacement=True, generator=self.gen)
        bits = torch.randint(0, 2, (batch, self.n_bits), generator=self.gen)
        x = torch.cat([F.one_hot(tasks, self.n_tasks).float(), bits.float()], dim=1)
        return x, self.labels(tasks, bits)


def per_task_loss(model, x, y, groups, n_tasks: int) -> np.ndarray:
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    sums = torch.zeros(n_tasks, dtype=losses.dtype).index_add_(0, groups, losses)
    return (sums / torch.bincount(groups, minlength=n_tasks)).numpy()


def run(cfg: QuantaConfig, run, seed: int) -> dict:
    data = sparse_parity(n_tasks=cfg.n_tasks, n_bits=cfg.n_bits, k=cfg.k, n_train=1,
                         n_test=cfg.test_per_task * cfg.n_tasks, zipf_exponent=cfg.zipf_exponent, seed=seed)
    sampler = OnlineSampler(data, seed)
    probs = np.array(data.info["frequencies"])
    torch.manual_seed(seed)
    model = MLP(cfg.n_tasks + cfg.n_bits, 2, width=cfg.width, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    evals = set(np.unique(np.geomspace(10, cfg.steps, cfg.n_eval).astype(int)).tolist())
    steps, losses = [], []

    def loss(step: int) -> torch.Tensor:
        x, y = sampler(cfg.batch_size)
        return F.cross_entropy(model(x), y)

    def evaluate(step: int) -> dict:
        per = per_task_loss(model, data.x_test, data.y_test, data.groups_test, cfg.n_tasks)
        steps.append(step)
        losses.append(per)
        return dict(mean_loss=float(probs @ per), tasks_learned=int(np.sum(per < LN2 / 2)),
                    **{f"task{i:02d}": float(v) for i, v in enumerate(per)})

    probe_every = max(1, cfg.steps // cfg.n_eval)
    # a fixed batch of the training distribution from its own generator (the training draws are untouched)
    stop_batch = OnlineSampler(data, seed + 1)(STOP_BATCH) if cfg.stopping != "none" else None
    loop = TrainingLoop(model, opt, cfg.steps, probe_every, loss, evaluate, watch="mean_loss",
                        eval_at=lambda step: step in evals, probes=cfg.probes,
                        probe_batch=(data.x_test[:256], data.y_test[:256]), probe_loss=F.cross_entropy,
                        stopping=stopping_driver(cfg, model, F.cross_entropy, stop_batch))
    train(run, loop)
    steps, losses = np.array(steps, dtype=float), np.array(losses)
    result = analyze(steps, losses, probs, cfg.zipf_exponent - 1.0)
    result.update(n_tasks=cfg.n_tasks, steps=cfg.steps, **loop.stop_result())
    _save_figure(run, cfg, steps, losses, probs, result)
    return result


def analyze(steps: np.ndarray, losses: np.ndarray, probs: np.ndarray, alpha: float) -> dict:
    """Transition steps and widths per task, the mean-loss power law and the step superposition."""
    n_tasks = losses.shape[1]
    t_half = [first_crossing(steps, losses[:, i], LN2 / 2, rising=False) for i in range(n_tasks)]
    widths = []
    for i in range(n_tasks):
        t10 = first_crossing(steps, losses[:, i], 0.9 * LN2, rising=False)
        t90 = first_crossing(steps, losses[:, i], 0.1 * LN2, rising=False)
        widths.append(None if t10 is None or t90 is None else float(np.log(t90 / max(t10, 1.0))))
    learned = [i for i in range(n_tasks) if t_half[i] is not None]
    mean = losses @ probs
    out: dict = {"alpha": alpha, "t_half": t_half, "widths": widths, "learned": len(learned),
                 "mean_loss_final": float(mean[-1])}
    if len(learned) < 3:
        return out
    t_learned = np.array([t_half[i] for i in learned])
    out["gamma"] = float(np.polyfit(np.log(1.0 / probs[learned]), np.log(t_learned), 1)[0])
    out["spearman"] = float(spearmanr(np.arange(len(learned)), t_learned)[0])
    done = [w for w in widths if w is not None]
    out["median_width"] = float(np.median(done)) if done else None
    t_all = np.array([t if t is not None else np.inf for t in t_half])
    superposition = np.array([LN2 * probs[s < t_all].sum() for s in steps])
    # from the first transition on, while some quantum is still unlearned (a finite sum of steps ends)
    fit = (steps >= t_learned.min()) & (superposition > 0)
    out["fit_range"] = [float(steps[fit][0]), float(steps[fit][-1])]
    slope, out["r2"] = loglog_slope(steps[fit], mean[fit])
    out["exponent_measured"] = -slope
    out["exponent_superposition"] = -loglog_slope(steps[fit], superposition[fit])[0]
    # the quanta model proper: t_i = c / p_i (gamma = 1), c the median of t_i p_i over learned tasks
    out["quanta_time_scale"] = float(np.median(t_learned * probs[learned]))
    t_model = out["quanta_time_scale"] / probs
    model = np.array([LN2 * probs[s < t_model].sum() for s in steps])
    ok = fit & (model > 0)
    out["exponent_quanta_model"] = -loglog_slope(steps[ok], model[ok])[0] if ok.sum() >= 3 else None
    out["exponent_infinite_tasks"] = alpha / (alpha + 1)
    return out


def check(result: dict) -> list[CheckRow]:
    if result["learned"] < 3:
        return [CheckRow.at_least("tasks learned (need >= 3 for the laws)", 3, result["learned"])]
    return [
        CheckRow.at_most("sharp: median per-task drop width ln(t_10%/t_90%)", WIDTH_MAX, result.get("median_width")),
        CheckRow.at_least("tasks learned in frequency order (Spearman)", SPEARMAN_MIN, result["spearman"]),
        CheckRow.relative("time per quantum: t_i ~ p_i^-gamma, gamma", 1.0, result["gamma"], GAMMA_TOLERANCE),
        CheckRow.at_least("smooth: mean loss vs steps power-law fit R^2", R2_MIN, result["r2"]),
        CheckRow.relative("mean-loss exponent vs superposition of per-task steps", result["exponent_superposition"],
                          result["exponent_measured"], EXPONENT_TOLERANCE),
    ]


def _save_figure(run, cfg: QuantaConfig, steps, losses, probs, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    colors = plt.cm.viridis(np.linspace(0, 1, losses.shape[1]))
    for i in range(losses.shape[1]):
        ax.plot(steps, losses[:, i], color=colors[i], lw=0.9)
    ax.plot(steps, losses @ probs, "k", lw=2.5, label="mean (training distribution)")
    ax.set(xscale="log", xlabel="step", ylabel="test loss (nats)", title=f"{cfg.n_tasks} sparse parities, per task",
           ylim=(0, 1.0))
    ax.legend(fontsize=8)
    ax = axes[1]
    mean = losses @ probs
    ax.loglog(steps, mean, "k-", label="mean loss")
    if "fit_range" in result:
        lo, hi = result["fit_range"]
        s = np.geomspace(lo, hi, 20)
        k = np.argmin(np.abs(steps - lo))
        ax.loglog(s, mean[k] * (s / steps[k]) ** -result["exponent_measured"], "C1--",
                  label=f"power law, exponent {result['exponent_measured']:.2f} (R^2 {result['r2']:.3f})")
        ax.loglog(s, mean[k] * (s / steps[k]) ** -result["exponent_infinite_tasks"], "C2:",
                  label=f"alpha/(alpha+1) = {result['exponent_infinite_tasks']:.2f} (infinitely many tasks)")
    t_all = np.array([t if t is not None else np.inf for t in result["t_half"]])
    ax.loglog(steps, [LN2 * probs[s < t_all].sum() for s in steps], "C0", drawstyle="steps-post", lw=1,
              label=f"sum of steps, exponent {result.get('exponent_superposition', float('nan')):.2f}")
    if "quanta_time_scale" in result:
        t_model = result["quanta_time_scale"] / probs
        ax.loglog(steps, [LN2 * probs[s < t_model].sum() for s in steps], "C2", drawstyle="steps-post", lw=1, alpha=0.7,
                  label=f"quanta model t_i = c/p_i, exponent {result.get('exponent_quanta_model') or float('nan'):.2f}")
    ax.set(xlabel="step", ylabel="loss", title="the average is a power law")
    ax.legend(fontsize=7)
    ax = axes[2]
    learned = [i for i, t in enumerate(result["t_half"]) if t is not None]
    if learned:
        ax.loglog(1.0 / probs[learned], [result["t_half"][i] for i in learned], "o")
        if "gamma" in result:
            x = 1.0 / probs[learned]
            t = np.array([result["t_half"][i] for i in learned])
            c = np.exp(np.mean(np.log(t) - result["gamma"] * np.log(x)))
            ax.loglog(x, c * x ** result["gamma"], "C1--", label=f"gamma = {result['gamma']:.2f} (quanta: 1)")
            ax.legend(fontsize=8)
    ax.set(xlabel="1 / task frequency", ylabel="transition step t_i", title="one quantum at a time")
    for a in axes:
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    run.save_figure(fig, "quanta")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="quanta",
    summary="multitask sparse parity: sharp per-task transitions in frequency order whose average is a power law",
    config=QuantaConfig,
    run=run,
    check=check,
    quick={"n_tasks": 32, "n_bits": 12, "zipf_exponent": 1.5, "width": 128, "lr": 3e-3, "steps": 6000},
)
