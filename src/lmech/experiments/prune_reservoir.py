r"""Pruning by reservoir membership vs magnitude pruning (issue 14, item 3).

Two tasks: an MLP on sklearn digits (``width`` x ``depth`` ReLU, 64 inputs, some of them constant)
and the MNIST-1D CNN (:class:`lmech.models.CNN1D`) on mnist1d. Each is trained once with AdamW on
minibatches, with a :class:`lmech.prune.PathUsage` in each mode attached, so the scores are the
diagonal of the parameter-space path Gramian :math:`\Gamma_{kk} = \sum_t\eta_t d_{t,k}^2`
(:mod:`lmech.prune`): ``reservoir`` uses the realized AdamW update (the optimizer's own metric),
``reservoir_grad`` the raw gradient (:math:`\Pi = I`). Then every weight matrix is pruned, per layer,
at each sparsity in ``sparsities`` by

* ``reservoir`` / ``reservoir_grad``: keep the weights the path used most (highest :math:`\Gamma_{kk}`),
* ``magnitude``: keep the largest :math:`|w_T|` (Han et al. 2015),
* ``displacement``: keep the largest :math:`|w_T - w_0|` (the net, not the path-integrated, motion),
* ``random``: the floor,

and the test accuracy is measured **before any fine-tuning**. Biases are kept.

Checks (tolerances fixed before the first full run):

* exact, per the definition: the gradient-mode usage of the first-layer weights fed by constant
  (always-zero, after centring) digits pixels is 0, i.e. they are in the reservoir: predicted 0,
  tolerance 0 (``max usage of dead-input weights <= 0``);
* the claim under test, per task: reservoir pruning at 50% keeps test accuracy within 0.01 of
  magnitude pruning or above it (one-sided, ``reservoir - magnitude >= -0.01``);
* the floor, per task: reservoir pruning at 80% beats random pruning (``reservoir - random >= 0``).

The three-seed study with tables and a figure is ``scripts/prune_study.py``; results in
docs/results/no-validation.md. Each task trains on :class:`lmech.experiments.loop.TrainingLoop`
(``probes=economy|full``: a Monitor every ``steps // 10`` steps, columns ``<task>/probe/...``).

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`): the gradient rules (``gate``,
``evidence``, ``train_loss``) read :func:`lmech.stopping.gradient_signals` (cross-entropy) on the
first :data:`STOP_BATCH` training examples, every ``steps // 10`` steps (``stop_patience`` counts
those), columns ``<task>/stop/...``; never the test set. A task whose rule fires ends there: its
usage is the path up to the stop and the stopped network is the one pruned. There is no
:class:`~lmech.probes.gramian.PathRecorder` here (the usage is :class:`lmech.prune.PathUsage`), so
the path rules are not offered. The result adds ``stop/rule`` and per task ``stop/step`` and
``stop/best_step`` (in ``tasks.<task>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, never, no_evaluation, train
from lmech.errors import ConfigError
from lmech.experiments.stopping_keys import GRADIENT_RULES, StoppingKeys, stopping_driver, validate_stopping_keys
from lmech.models import CNN1D, MLP
from lmech.prune import PathUsage, magnitude_scores, prune_masks, pruned_copy, random_scores
from lmech.tasks import digits, mnist1d

METHODS = ("reservoir", "reservoir_grad", "magnitude", "displacement", "random")
TASKS = ("mlp-digits", "cnn-mnist1d")
STOP_BATCH = 512  # training examples the stopping rules' gradient signals are measured on (fewer if n_train is)


@dataclass
class PruneReservoirConfig(StoppingKeys):
    tasks: str = "mlp-digits,cnn-mnist1d"       # comma-separated, from mlp-digits, cnn-mnist1d
    sparsities: str = "0.5,0.8,0.9"
    mlp_width: int = 256
    mlp_depth: int = 2
    mlp_steps: int = 3000
    mlp_lr: float = 1e-3
    cnn_channels: int = 32
    cnn_steps: int = 4000
    cnn_lr: float = 3e-3
    n_train: int = 4000                          # mnist1d training examples (test: 1000)
    batch_size: int = 100
    weight_decay: float = 0.01
    # instruments: none, or a lmech.Monitor preset (economy, full) on each task's training, every steps // 10
    probes: ProbeLevel = "none"

    def task_list(self) -> list[str]:
        return [t.strip() for t in str(self.tasks).split(",") if t.strip()]

    def sparsity_list(self) -> list[float]:
        try:
            return [float(s) for s in str(self.sparsities).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"sparsities must be comma-separated numbers, got {self.sparsities!r}") from None

    def validate(self) -> None:
        ts = self.task_list()
        require(ts and all(t in TASKS for t in ts), f"tasks must be a comma-separated subset of {', '.join(TASKS)}")
        ss = self.sparsity_list()
        require(ss and all(0 < s < 1 for s in ss), "sparsities must be numbers in (0, 1), e.g. 0.5,0.8,0.9")
        require(min(self.mlp_steps, self.cnn_steps, self.batch_size, self.mlp_width, self.cnn_channels) >= 1,
                "steps, batch_size, mlp_width and cnn_channels must be positive")
        require(self.mlp_lr > 0 and self.cnn_lr > 0 and self.weight_decay >= 0,
                "learning rates must be > 0 and weight_decay >= 0")
        require(self.n_train >= self.batch_size, "n_train must be at least batch_size")
        validate_stopping_keys(self, ("none", *GRADIENT_RULES), STOP_BATCH,
                               "the usage is recorded by PathUsage; there is no PathRecorder for the path rules")


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def train_with_usage(model, x, y, steps: int, lr: float, batch_size: int, weight_decay: float, seed: int,
                     run=None, probes: ProbeLevel = "none", prefix: str = "", stopping=None):
    """AdamW on minibatches (a private generator seeded ``seed``), both usage modes recorded
    after every update; ``probes`` attaches a Monitor writing into ``run`` under ``prefix``;
    ``stopping``: a config with the stopping keys (module docstring; ``None``: none).

    Returns ``(usage_update, usage_gradient, initial_weights, stop_result)``.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    up, gr = PathUsage(model, mode="update"), PathUsage(model, mode="gradient")
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    def record_usage(step: int, loss: float) -> None:
        up.step(lr)
        gr.step(lr)

    every = max(1, steps // 10)
    driver = None if stopping is None else stopping_driver(stopping, model, F.cross_entropy,
                                                           (x[:STOP_BATCH], y[:STOP_BATCH]))
    fed = never if driver is None else (lambda step: step > 0 and step % every == 0)
    loop = TrainingLoop(model, opt, steps, every, loss, no_evaluation, watch="", eval_at=fed,
                        on_step=record_usage, probes=probes, probe_batch=(x[:256], y[:256]),
                        probe_loss=F.cross_entropy, probe_prefix=prefix, stopping=driver)
    train(run, loop)
    return up, gr, w0, loop.stop_result()


def method_scores(model, up: PathUsage, gr: PathUsage, w0: dict, seed: int) -> dict[str, dict]:
    mag = magnitude_scores(model)
    by = dict(model.named_parameters())
    return {
        "reservoir": up.scores(),
        "reservoir_grad": gr.scores(),
        "magnitude": mag,
        "displacement": {n: (by[n].detach() - w0[n]).abs().double() for n in mag},
        "random": random_scores(model, seed=10_000 + seed),
    }


def run_task(task: str, cfg: PruneReservoirConfig, seed: int, run=None) -> dict:
    """Train one task at ``seed``; test accuracy of every method at every sparsity (no fine-tuning).
    With ``cfg.probes``, a Monitor writes into ``run`` under ``<task>/``."""
    torch.manual_seed(seed)
    if task == "mlp-digits":
        data = digits(seed=seed)
        model = MLP(64, 10, width=cfg.mlp_width, depth=cfg.mlp_depth)
        steps, lr = cfg.mlp_steps, cfg.mlp_lr
    else:
        data = mnist1d(n_train=cfg.n_train, n_test=1000, seed=42 + seed)
        model = CNN1D(in_len=40, n_classes=10, channels=cfg.cnn_channels)
        steps, lr = cfg.cnn_steps, cfg.cnn_lr
    up, gr, w0, stop = train_with_usage(model, data.x_train, data.y_train, steps, lr, cfg.batch_size,
                                        cfg.weight_decay, seed, run, cfg.probes, f"{task}/", cfg)
    out = {"task": task, "seed": seed, "dense_test_acc": _accuracy(model, data.x_test, data.y_test),
           "dense_train_acc": _accuracy(model, data.x_train, data.y_train), "acc": {},
           **{k: v for k, v in stop.items() if k != "stop/rule"}}
    for method, scores in method_scores(model, up, gr, w0, seed).items():
        for s in cfg.sparsity_list():
            out["acc"][f"{method}@{s:g}"] = _accuracy(pruned_copy(model, prune_masks(scores, s)),
                                                      data.x_test, data.y_test)
    if task == "mlp-digits":
        dead = (data.x_train.std(0) == 0).nonzero().flatten()             # constant pixels (0 after centring)
        w1 = gr.scores()["layers.0.weight"][:, dead]                      # (width, n_dead)
        out["n_dead_inputs"] = int(dead.numel())
        out["dead_input_usage_max"] = float(w1.max()) if dead.numel() else float("nan")
        out["dead_input_usage_update_max"] = float(up.scores()["layers.0.weight"][:, dead].max()) if dead.numel() else float("nan")
        out["usage_median"] = float(gr.scores()["layers.0.weight"].median())
    return out


def run(cfg: PruneReservoirConfig, run, seed: int) -> dict:
    torch.set_num_threads(1)
    result: dict = {"sparsities": cfg.sparsity_list(), "tasks": {}}
    if cfg.stopping != "none":
        result["stop/rule"] = cfg.stopping
    for i, task in enumerate(cfg.task_list()):
        r = run_task(task, cfg, seed, run)
        result["tasks"][task] = r
        run.log(i, dense_test_acc=r["dense_test_acc"], **{k.replace("@", "_at_"): v for k, v in r["acc"].items()})
        for k in ("n_dead_inputs", "dead_input_usage_max", "dead_input_usage_update_max", "usage_median"):
            if k in r:
                result[k] = r[k]
    from lmech.experiments.figures.prune import prune_figure

    run.save_figure(prune_figure([result["tasks"]], cfg.sparsity_list()), "prune_reservoir")
    return result


def check(result: dict) -> list[CheckRow]:
    rows = []
    if "dead_input_usage_max" in result and np.isfinite(result["dead_input_usage_max"]):
        rows.append(CheckRow.at_most("gradient-mode usage Gamma_kk of weights fed by constant digits pixels "
                                     "(reservoir: exactly 0)", 0.0, result["dead_input_usage_max"]))
    ss = result["sparsities"]
    lo = 0.5 if 0.5 in ss else ss[0]
    mid = 0.8 if 0.8 in ss else ss[-1]
    for task, r in result["tasks"].items():
        acc = r["acc"]
        rows.append(CheckRow.at_least(f"{task}: test acc reservoir - magnitude at {lo:g} sparsity (claim)", -0.01,
                                      acc[f"reservoir@{lo:g}"] - acc[f"magnitude@{lo:g}"]))
        rows.append(CheckRow.at_least(f"{task}: test acc reservoir - random at {mid:g} sparsity (floor)", 0.0,
                                      acc[f"reservoir@{mid:g}"] - acc[f"random@{mid:g}"]))
    return rows


EXPERIMENT = Experiment(
    name="prune-reservoir",
    summary="prune the weights the training path never used (path-Gramian diagonal) vs magnitude, no fine-tuning",
    config=PruneReservoirConfig,
    run=run,
    check=check,
    quick={"mlp_width": 64, "mlp_steps": 200, "cnn_channels": 16, "cnn_steps": 200, "n_train": 500,
           "sparsities": "0.5,0.8"},
)
