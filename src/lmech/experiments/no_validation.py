r"""Validation-free early stopping and noisy-label detection on one noisy task (issue 14).

One training run of :func:`lmech.experiments._no_validation.recorded_run` (full-batch gradient
descent, squared loss, a :class:`lmech.probes.gramian.PathRecorder` attached): every stopping
signal of :mod:`lmech.stopping` is logged at each evaluation, the rules are replayed on them, and
the noisy-label scores of :mod:`lmech.probes.self_influence` are scored by AUROC against the known
corrupted examples. The full benchmark over tasks, noise levels and seeds (with retraining) is
``scripts/no_validation_study.py``; results in docs/results/no-validation.md.

Checks (tolerances fixed when the entry was written, from the issue's target and the benchmark's
protocol, not from this entry's own runs):

* the path leave-one-out rule (:class:`lmech.stopping.PathLOOStopping`) selects a step whose test
  loss is within 10% of the oracle's (the issue's target is 5% on most tasks; one run, one seed);
* the path self-influence flags the flipped labels better than chance by a margin: AUROC >= 0.7;
* the complexity measure equals the leave-one-out estimate minus the training loss
  (:math:`C = \widehat R_\text{loo} - \Phi_S`, an identity of the definitions; relative 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmech.experiments.base import CheckRow, Experiment, require


@dataclass
class NoValidationConfig:
    task: Literal["digits", "mnist1d", "teacher", "inr"] = "digits"
    noise: float = 0.2
    n_train: int = 256
    width: int = 128
    steps: int = 1500
    every: int = 20
    patience: int = 10
    step_size: float = 0.3

    def validate(self) -> None:
        from lmech.experiments._no_validation import TASKS

        require(self.task in TASKS, f"task must be one of {', '.join(TASKS)}")
        require(0.0 < self.noise < 0.5, f"noise (corrupted fraction q) must be in (0, 0.5), got {self.noise}")
        require(self.n_train >= 16, "n_train must be >= 16")
        require(self.width > 0, "width must be positive")
        require(self.every >= 1 and self.steps % self.every == 0, "every must be >= 1 and divide steps")
        require(self.steps // self.every > self.patience >= 1, "need 1 <= patience < steps / every evaluations")
        require(0 < self.step_size < 2, "step_size (eta lambda_max / n) must be in (0, 2)")


def run(cfg: NoValidationConfig, run, seed: int) -> dict:
    import numpy as np

    from lmech.experiments._no_validation import auroc, make_task, recorded_run, score_stopping
    from lmech.probes.self_influence import path_self_influence

    task = make_task(cfg.task, cfg.noise, seed, n_train=cfg.n_train)
    rr = recorded_run(task, width=cfg.width, steps=cfg.steps, every=cfg.every, step_size=cfg.step_size,
                      seed=seed, patience=cfg.patience)
    for row in rr.rows:
        run.log(int(row["step"]), **{k: v for k, v in row.items() if k != "step" and np.isfinite(v)})
    stopping = score_stopping(rr.rows, task.x.shape[0], cfg.patience)
    result = {"task": cfg.task, "noise": cfg.noise, "lr": rr.lr, "n_corrupted": int(rr.corrupted.sum()),
              "oracle_step": stopping["oracle"]["selected"], "oracle_test_loss": stopping["oracle"]["test_loss"]}
    for name, s in stopping.items():
        if name != "oracle":
            result[f"{name}_ratio"] = s["ratio"]
            result[f"{name}_selected"] = s["selected"]
            result[f"{name}_saved"] = s["saved"]
    for name, scores in rr.scores.items():
        result[f"auroc_{name}"] = auroc(scores, rr.corrupted)
    last = rr.rows[-1]
    # the complexity measure at the end of training against the logged estimate and loss
    import torch

    model_out = torch.tensor(np.asarray(rr.final_outputs)).reshape(-1, 1)
    si = path_self_influence(rr.final_D, model_out, task.y)
    result["complexity"] = si.complexity
    result["poprisk_loo_minus_loss"] = last["poprisk_loo"] - last["loss"]
    return result


def check(result: dict) -> list[CheckRow]:
    return [
        CheckRow.relative("test loss at the path-LOO stop / oracle's", 1.0, result["path-loo_ratio"], 0.10),
        CheckRow.at_least("AUROC of the path self-influence for the corrupted examples", 0.7,
                          result["auroc_self-influence@stop"]),
        CheckRow.relative("complexity measure C vs poprisk_loo - training loss (identity)",
                          result["poprisk_loo_minus_loss"], result["complexity"], 1e-6),
    ]


EXPERIMENT = Experiment(
    name="no-validation",
    summary="validation-free early stopping (path LOO, gate fraction, channel noise vs evidence-based, "
            "train-loss patience, oracle) and noisy-label detection by self-influence",
    config=NoValidationConfig,
    run=run,
    check=check,
    quick={"n_train": 64, "width": 32, "steps": 200, "every": 10, "patience": 5},
)
