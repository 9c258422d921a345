r"""The machinery of the no-validation benchmark (``scripts/no_validation_study.py`` and the
``no-validation`` catalog entry): noisy tasks, one recorded training run that logs every stopping
signal and every noisy-label score, the scoring of the stopping rules against the oracle, and
retraining without the flagged examples.

Protocol (fixed before any run; docs/results/no-validation.md):

* **Tasks**, all with one output and the squared loss :math:`\frac12(u-y)^2` of the theory:
  ``digits`` (sklearn digits, label ``>= 5``, +-1) and ``mnist1d`` (MNIST-1D 0 vs 1, +-1) with a
  fraction :math:`q` of training labels flipped (:func:`lmech.experiments._signal.binary_task`);
  ``teacher`` (regression on a random tanh teacher, 8 inputs) and ``inr`` (a 1-D signal fitted from
  256 grid samples through 32 fixed random Fourier features, :mod:`lmech.experiments.inr_noise`'s
  signal) with a fraction :math:`q` of the training targets corrupted by Gaussian noise of the
  targets' standard deviation (:func:`lmech.tasks.add_label_noise`). The test set is clean.
* **Training**: an MLP (one hidden ReLU layer, readout weights scaled by ``head_scale``, default 1, at
  initialization), full-batch gradient descent at
  :math:`\eta\lambda_{\max}(K_0)/n` = ``step_size`` for ``steps`` steps, with a
  :class:`lmech.probes.gramian.PathRecorder` advanced every ``every`` steps (kernel frozen in
  between). At every evaluation: the training loss, ``poprisk_loo``/``poprisk_gcv``, the
  gradient signals on the whole training set (:func:`lmech.stopping.gradient_signals`), the
  channel-noise risk (:func:`lmech.stopping.channel_noise_signals`), and, for scoring only, the
  test loss and error.
* **Stopping rules** replayed on the logged signals (:func:`lmech.stopping.replay`: each sees
  only the past), all with the same ``patience`` (evaluations) and no tuning; the train-loss rule
  with relative ``min_delta`` = 0.01. Oracle: the evaluation with the smallest test loss.
* **Noisy-label scores** from the same run: the path self-influence
  (:func:`lmech.probes.self_influence.path_self_influence`) at the step the path-LOO rule selects
  (``self-influence@stop``) and at the end of training (``self-influence``), the final per-example loss, the loss
  at step ``steps // 10`` and TracIn (:class:`lmech.probes.self_influence.TracInSelfInfluence`,
  checkpoints at every evaluation). AUROC for the corrupted examples; then the top
  ``round(q n)`` of each score are dropped and the network retrained from the same
  initialization with the same step size and steps (plus the drop of the truly corrupted ones, a
  reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lmech.experiments._signal import binary_task, gd_step_size, initial_kernel, sign_error
from lmech.models import MLP
from lmech.probes.gramian import PathRecorder, half_mse
from lmech.probes.self_influence import TracInSelfInfluence, path_self_influence, per_example_loss
from lmech.stopping import (
    ChannelNoiseStopping,
    EvidenceStopping,
    GateFractionStopping,
    PathLOOStopping,
    TrainLossPatience,
    channel_noise_signals,
    gradient_signals,
    oracle_step,
    replay,
)

TASKS = ("digits", "mnist1d", "teacher", "inr")
OURS = ("path-loo", "path-gcv", "gate-fraction", "channel-noise")
BASELINES = ("evidence", "train-loss")
SCORES = ("self-influence@stop", "self-influence", "final-loss", "early-loss", "tracin")


@dataclass
class NoisyTask:
    """Training set with a corrupted subset, and a clean test set (one output)."""

    name: str
    kind: str                     # "classification" (+-1 targets) or "regression"
    x: Tensor
    y: Tensor
    corrupted: Tensor             # (n,) bool
    x_test: Tensor
    y_test: Tensor
    info: dict = field(default_factory=dict)


def _inr_features(t: Tensor, seed: int, n_features: int = 32, scale: float = 8.0) -> Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    B = scale * torch.randn(n_features, 1, generator=g)
    z = 2 * math.pi * t @ B.T
    return torch.cat([torch.sin(z), torch.cos(z)], dim=1)


def make_task(name: str, q: float, seed: int, n_train: int = 256) -> NoisyTask:
    """One of :data:`TASKS` with noise fraction ``q`` (module docstring)."""
    from lmech.tasks import add_label_noise, teacher_student
    from lmech.tasks.base import TaskData

    if name in ("digits", "mnist1d"):
        d = binary_task(name, n_train, 2, q, seed)
        return NoisyTask(name, "classification", d.x, d.y, (d.y != d.y_clean).reshape(-1), d.x_test, d.y_test,
                         info=d.info)
    if name == "teacher":
        base = teacher_student(n_train=n_train, n_test=2000, d_in=8, teacher_width=16, teacher_depth=1,
                               activation="tanh", seed=seed)
    elif name == "inr":
        from lmech.experiments.inr_noise import signal

        t = (torch.arange(n_train, dtype=torch.float32) / n_train)[:, None]
        t_test = ((torch.arange(4 * n_train, dtype=torch.float32) + 0.5) / (4 * n_train))[:, None]
        base = TaskData(name="inr-1d", x_train=_inr_features(t, seed), y_train=signal(t),
                        x_test=_inr_features(t_test, seed), y_test=signal(t_test), kind="regression", num_classes=None,
                        info={"signal": "inr_noise 1-D"})
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    noisy = add_label_noise(base, q, seed=seed)
    return NoisyTask(name, "regression", noisy.x_train.float(), noisy.y_train.float(), noisy.corrupted,
                     base.x_test.float(), base.y_test.float(), info=noisy.info)


@dataclass
class RecordedStudyRun:
    rows: list[dict]
    scores: dict[str, np.ndarray]
    corrupted: np.ndarray
    lr: float
    init_state: dict
    width: int
    final_D: Tensor | None = None
    final_outputs: object = None


def _model(d_in: int, width: int, head_scale: float) -> torch.nn.Module:
    """One-hidden-layer ReLU MLP; the readout weights are scaled by ``head_scale`` so the initial
    function is small (otherwise its random outputs dominate the test loss of the first steps)."""
    model = MLP(d_in, 1, width=width, depth=1)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(head_scale)
    return model


def _evaluate(model, task: NoisyTask) -> dict[str, float]:
    with torch.no_grad():
        model.eval()
        out = model(task.x_test)
        model.train()
    row = {"test_loss": float(half_mse(out, task.y_test))}
    row["test_error"] = sign_error(out, task.y_test) if task.kind == "classification" else row["test_loss"]
    return row


def recorded_run(task: NoisyTask, *, width: int = 128, steps: int = 2000, every: int = 10,
                 step_size: float = 0.3, seed: int = 0, patience: int = 10, head_scale: float = 1.0) -> RecordedStudyRun:
    """Train once with every signal and score logged (module docstring)."""
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of every ({every})")
    x, y = task.x, task.y
    torch.manual_seed(seed)
    model = _model(x.shape[1], width, head_scale)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    lr = gd_step_size(initial_kernel(model, x), step_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = PathRecorder(model, x, y, x[:2])
    rec.start()
    tracin = TracInSelfInfluence(model, half_mse, x, y)
    early_step = max(every, (steps // 10) // every * every)
    rows, early_loss, si_by_step = [], None, {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        half_mse(model(x), y).backward()
        opt.step()
        if step % every:
            continue
        out = rec.step(lr, steps=every)
        tracin.step(lr, steps=every)
        row = {"step": step, "loss": out["loss"], "poprisk_loo": out["poprisk_loo"], "poprisk_gcv": out["poprisk_gcv"]}
        row.update({k: v for k, v in gradient_signals(model, half_mse, x, y).items() if k != "loss"})
        row.update(channel_noise_signals(rec))
        row.update(_evaluate(model, task))
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"training diverged at step {step}")
        rows.append(row)
        u, _ = rec.outputs()
        si_by_step[step] = path_self_influence(rec.path.D, u.reshape(-1, 1), y).scores.numpy()
        if step == early_step:
            early_loss = per_example_loss(model, half_mse, x, y).numpy()
    # the self-influence where the validation-free path-LOO rule stops (one run, no held-out data)
    stop = replay(PathLOOStopping("loo", patience=patience), rows).selected_step()
    scores = {"self-influence@stop": si_by_step[stop], "self-influence": si_by_step[steps], "final-loss": per_example_loss(model, half_mse, x, y).numpy(),
              "early-loss": early_loss, "tracin": tracin.scores.numpy()}
    u, _ = rec.outputs()
    return RecordedStudyRun(rows, scores, task.corrupted.numpy(), lr, init_state, width, rec.path.D.clone(),
                            u.numpy().copy())


def make_criteria(n: int, patience: int = 10) -> dict:
    """The rules of the benchmark, one per name, all with the same patience (evaluations)."""
    return {
        "path-loo": PathLOOStopping("loo", patience=patience),
        "path-gcv": PathLOOStopping("gcv", patience=patience),
        "gate-fraction": GateFractionStopping(batch_size=n, patience=patience),
        "channel-noise": ChannelNoiseStopping(patience=patience),
        "evidence": EvidenceStopping(patience=patience),
        "train-loss": TrainLossPatience(patience=patience, min_delta=0.01),
    }


def score_stopping(rows: list[dict], n: int, patience: int = 10) -> dict[str, dict]:
    """Per rule: selected and stopping step, test loss / error there, ratio to the oracle, steps saved."""
    steps = [r["step"] for r in rows]
    by_step = {r["step"]: r for r in rows}
    last = steps[-1]
    best = oracle_step(steps, [r["test_loss"] for r in rows])
    ref = by_step[best]
    out = {"oracle": {"selected": best, "stop": last, "test_loss": ref["test_loss"], "test_error": ref["test_error"],
                      "ratio": 1.0, "error_ratio": 1.0, "saved": 0, "fired": True}}
    for name, crit in make_criteria(n, patience).items():
        replay(crit, rows)
        sel = crit.selected_step()
        stop = crit.stop_step if crit.should_stop else last
        r = by_step[sel]
        out[name] = {"selected": sel, "stop": stop, "test_loss": r["test_loss"], "test_error": r["test_error"],
                     "ratio": r["test_loss"] / ref["test_loss"],
                     "error_ratio": r["test_error"] / ref["test_error"] if ref["test_error"] > 0 else float("nan"),
                     "saved": last - stop, "fired": crit.should_stop}
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels.astype(int), np.nan_to_num(scores, nan=-np.inf, posinf=1e300)))


def retrain_without(task: NoisyTask, run: RecordedStudyRun, drop: np.ndarray, steps: int, every: int) -> dict:
    """Retrain from the run's initialization on the kept examples (same step size per example and
    steps); the test loss at the end and its minimum over evaluations."""
    keep = torch.ones(task.x.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(drop, dtype=torch.long)] = False
    x, y = task.x[keep], task.y[keep]
    model = _model(task.x.shape[1], run.width, 1.0)
    model.load_state_dict(run.init_state)
    # the loss is a mean: the same step per remaining example as in the full run
    opt = torch.optim.SGD(model.parameters(), lr=run.lr * int(keep.sum()) / task.x.shape[0])
    losses = []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        half_mse(model(x), y).backward()
        opt.step()
        if step % every == 0:
            losses.append(_evaluate(model, task))
    return {"final_test_loss": losses[-1]["test_loss"], "final_test_error": losses[-1]["test_error"],
            "min_test_loss": min(v["test_loss"] for v in losses)}


def noisy_label_study(task: NoisyTask, run: RecordedStudyRun, steps: int, every: int, retrain: bool = True) -> dict:
    """AUROC of every score and, with ``retrain``, the test loss after dropping each score's top ``|corrupted|``."""
    out = {f"auroc_{name}": auroc(s, run.corrupted) for name, s in run.scores.items()}
    m = int(run.corrupted.sum())
    if retrain and m > 0:
        drops = {name: np.argsort(-np.nan_to_num(s, nan=-np.inf))[:m] for name, s in run.scores.items()
                 if name != "self-influence"}     # the end-of-training variant: AUROC only (CPU budget)
        drops["true-corrupted"] = np.flatnonzero(run.corrupted)
        for name, idx in drops.items():
            r = retrain_without(task, run, idx, steps, every)
            out[f"drop_{name}_final_test_loss"] = r["final_test_loss"]
            out[f"drop_{name}_final_test_error"] = r["final_test_error"]
            out[f"drop_{name}_min_test_loss"] = r["min_test_loss"]
    out["no_drop_final_test_loss"] = run.rows[-1]["test_loss"]
    out["no_drop_final_test_error"] = run.rows[-1]["test_error"]
    return out
