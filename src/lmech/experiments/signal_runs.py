"""Shared pieces of the signal-channel / reservoir experiments (``coupling``, ``label-noise``,
``double-descent``, ``grokking-channel``): binary +-1 tasks, the recorded training loop and the
normalized gradient-descent step size.

Conventions: every experiment here trains with the squared loss of the theory,
:func:`lmech.probes.gramian.half_mse` (targets +-1 for binary tasks, accuracy = sign agreement), so
the recorder's time step is the learning rate itself (``loss_scale = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lmech.experiments.loop import ProbeLevel, TrainingLoop, never, no_evaluation, train
from lmech.probes.gramian import GramianReadout, PathRecorder, half_mse

BINARY_TASKS = ("digits", "mnist1d", "teacher")


@dataclass
class BinaryData:
    """A +-1 binary task: training set S (with clean labels), query set Q and a larger test set."""

    x: Tensor
    y: Tensor
    y_clean: Tensor
    x_query: Tensor
    y_query: Tensor
    y_query_noisy: Tensor
    x_test: Tensor
    y_test: Tensor
    y_test_noisy: Tensor
    info: dict = field(default_factory=dict)


def _pm(labels: Tensor) -> Tensor:
    return (2.0 * labels.float() - 1.0).unsqueeze(1)


def binary_task(task: str, n_train: int, n_query: int, noise: float, seed: int, n_test: int = 2000) -> BinaryData:
    r"""A binary task with +-1 targets and ``noise`` (fraction q) of the training labels flipped.

    * ``digits``: scikit-learn 8x8 digits, label ``digit >= 5`` (first ``n_train`` of the shuffled
      training split; the 449-example test split);
    * ``mnist1d``: MNIST-1D digits 0 vs 1 (the 40-sample signals of :func:`lmech.tasks.mnist1d`);
    * ``teacher``: Gaussian inputs in 8 dimensions, label = sign of a random tanh teacher
      (16 hidden units) above its median.

    Label noise flips an exact fraction ``noise`` of the training labels
    (:func:`lmech.tasks.add_label_noise` with 2 classes). ``y_test_noisy`` flips the same fraction
    of the *test* labels (an independent draw): the population the training labels come from,
    which the population-risk estimate targets. The query set Q is the first ``n_query`` test
    examples (``y_query_noisy`` their noisy labels). Test error is measured on the clean labels.
    """
    from lmech.tasks import add_label_noise, digits, mnist1d, teacher_student
    from lmech.tasks.base import TaskData

    if task not in BINARY_TASKS:
        raise ValueError(f"task must be one of {', '.join(BINARY_TASKS)}, got {task!r}")
    if task == "digits":
        d = digits(seed=seed)
        if n_train > d.n_train:
            raise ValueError(f"digits has {d.n_train} training examples; n_train={n_train} is too many")
        base = TaskData(name="digits-binary", x_train=d.x_train[:n_train], y_train=(d.y_train[:n_train] >= 5).long(),
                        x_test=d.x_test, y_test=(d.y_test >= 5).long(), kind="classification", num_classes=2,
                        info={"task": "digits >= 5"})
    elif task == "mnist1d":
        d = mnist1d(n_train=4000, n_test=4000, seed=42 + seed)
        tr, te = (d.y_train <= 1), (d.y_test <= 1)
        if int(tr.sum()) < n_train:
            raise ValueError(f"mnist1d 0-vs-1 has {int(tr.sum())} training examples; n_train={n_train} is too many")
        base = TaskData(name="mnist1d-01", x_train=d.x_train[tr][:n_train], y_train=d.y_train[tr][:n_train],
                        x_test=d.x_test[te][:n_test], y_test=d.y_test[te][:n_test], kind="classification",
                        num_classes=2, info={"task": "mnist1d 0 vs 1"})
    else:
        ts = teacher_student(n_train=n_train, n_test=n_test, d_in=8, teacher_width=16, teacher_depth=1,
                             activation="tanh", seed=seed)
        thr = ts.y_train.median()
        base = TaskData(name="teacher-binary", x_train=ts.x_train, y_train=(ts.y_train[:, 0] > thr).long(),
                        x_test=ts.x_test, y_test=(ts.y_test[:, 0] > thr).long(), kind="classification",
                        num_classes=2, info={"task": "sign of a tanh teacher above its median"})
    if n_query > base.n_test:
        raise ValueError(f"n_query={n_query} exceeds the {base.n_test} test examples")
    noisy = add_label_noise(base, noise, seed=seed)
    test_as_train = TaskData(name="test", x_train=base.x_test, y_train=base.y_test, x_test=base.x_test[:1],
                             y_test=base.y_test[:1], kind="classification", num_classes=2, info={})
    test_noisy = _pm(add_label_noise(test_as_train, noise, seed=seed + 1).y_train)
    return BinaryData(x=noisy.x_train, y=_pm(noisy.y_train), y_clean=_pm(noisy.y_train_clean),
                      x_query=base.x_test[:n_query], y_query=_pm(base.y_test[:n_query]),
                      y_query_noisy=test_noisy[:n_query], x_test=base.x_test, y_test=_pm(base.y_test),
                      y_test_noisy=test_noisy, info={**base.info, "n_corrupted": int(noisy.corrupted.sum())})


def sign_error(out: Tensor, y: Tensor) -> float:
    """Fraction of examples whose output sign differs from the +-1 target."""
    return float((torch.sign(out) != y).float().mean())


def gd_step_size(kernel: Tensor, c: float) -> float:
    r"""The learning rate :math:`\eta = c\,n/\lambda_{\max}(K)` for the ``n x n`` kernel ``K``
    (:math:`\eta\lambda_{\max}/n = c`: the top output mode of gradient descent decays by :math:`1-c`
    per step; stable below 2)."""
    lam = float(torch.linalg.eigvalsh(kernel.double())[-1])
    if not lam > 0:
        raise ValueError("the kernel at the current weights is zero; the model cannot move its outputs")
    return c * kernel.shape[0] / lam


def initial_kernel(model: nn.Module, x: Tensor) -> Tensor:
    """The plain NTK :math:`JJ^\top` of ``model`` on ``x`` now (eval mode, float64)."""
    from lmech.probes.ntk import ntk

    was = model.training
    model.eval()
    K = ntk(model, x).double()
    model.train(was)
    return K


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, batch_size: int | None = None,
                    dataset_size: int | None = None) -> torch.optim.Optimizer | None:
    """``gd``/``sgd`` -> SGD without momentum; ``adam``/``adamw``/``poprisk`` through the registry."""
    from lmech.optim import build_optimizer as registry

    if name in ("gd", "sgd"):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "poprisk":
        return registry("poprisk", params, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                        dataset_size=dataset_size)
    return registry(name, params, lr=lr, weight_decay=weight_decay)


@dataclass
class RecordedRun:
    """What :func:`record_training` returns."""

    recorder: PathRecorder
    readouts: list[tuple[int, GramianReadout]]
    rows: list[dict]
    lr: float
    stop: dict = field(default_factory=dict)   # TrainingLoop.stop_result(): {} without a stopping rule


class EntryRecorder:
    """The entry's own :class:`PathRecorder` as a :class:`lmech.stopping.driver.StoppingDriver`
    sees it: one recorder, not a second. :func:`record_training` starts and advances it (at its own
    recording interval, with its learning rate); :meth:`step` hands the driver the scalars of the
    last record, every other attribute is the recorder's (the channel-noise signals read its
    ``path``, ``outputs()``, ``y``, ``n``)."""

    def __init__(self, recorder: PathRecorder, scalars: Callable[[], dict]):
        self._recorder, self._scalars = recorder, scalars

    def start(self) -> None:
        """Started already, at the initial weights, by the entry."""

    def step(self, batch=None) -> dict:
        return self._scalars()

    def __getattr__(self, name: str):
        return getattr(self._recorder, name)


def record_training(model: nn.Module, x: Tensor, y: Tensor, x_query: Tensor, y_query: Tensor, *,
                    optimizer: str, lr: float | None, steps: int, every: int, readout_every: int,
                    run=None, y_clean: Tensor | None = None, x_test: Tensor | None = None,
                    y_test: Tensor | None = None, weight_decay: float = 0.0, batch_size: int = 0,
                    step_size: float = 0.3, adaptive: bool = False, window: int | None = None,
                    seed: int = 0, readout_kwargs: dict | None = None,
                    on_readout: Callable[[int, PathRecorder, GramianReadout, dict], None] | None = None,
                    keep_readouts: bool = True, probes: ProbeLevel = "none", probe_prefix: str = "",
                    probe_run=None, stopping=None, stop_every: int | None = None) -> RecordedRun:
    r"""Train ``model`` on ``(x, y)`` with :func:`half_mse` and a :class:`PathRecorder` attached.

    ``optimizer``: ``gd``/``sgd`` (plain SGD), ``adam``, ``adamw`` or ``poprisk``; full batch unless
    ``0 < batch_size < n`` (minibatches must be recorded every step). ``lr=None`` for gd/sgd uses
    :func:`gd_step_size` with ``step_size`` at the initial weights (``adaptive``: recomputed at every
    record from the current kernel, i.e. normalized gradient descent). The recorder is advanced
    every ``every`` optimizer steps (``sgd``: every step) and read out every ``readout_every``
    steps. The recorder's step scalars (population-risk estimates, ``lin_error``, ...) go to
    ``run.log`` at every record; at each readout so do the readout's scalars and the train / test
    losses and errors (and the :math:`W_S` spectrum to ``run.log_array``), and
    ``on_readout(step, recorder, readout, row)`` may add to the row before it is logged.

    The loop is a :class:`lmech.experiments.loop.TrainingLoop` (the recorder and the readouts in
    its ``on_step``); ``probes`` attaches a Monitor every ``readout_every`` steps on the first 256
    training examples, writing ``<probe_prefix>probe/...`` columns into ``probe_run`` (default ``run``).

    ``stopping``: the entry's config with :class:`lmech.experiments.stopping_keys.StoppingKeys`
    (``None`` or ``stopping="none"``: nothing changes). The rule is fed every ``stop_every`` steps
    (default ``readout_every``; a multiple of ``every``), on training data only: the gradient
    signals with :func:`half_mse` on all of ``(x, y)``, the path signals (``poprisk_loo``,
    ``poprisk_gcv``, ``leverage``: functions of the training outputs and the path over S) from
    this recorder (:class:`EntryRecorder`), the channel-noise risk from its :math:`W_S`; none of its
    query-set quantities. Training ends at the evaluation where the rule fires; if that step has
    no readout yet, one is taken there, so ``readouts[-1]`` and ``rows[-1]`` are at the stop.
    """
    n = x.shape[0]
    full_batch = batch_size <= 0 or batch_size >= n
    if not full_batch and every != 1:
        raise ValueError("minibatch training must be recorded every step (every=1)")
    if steps % every or readout_every % every:
        raise ValueError(f"steps ({steps}) and readout_every ({readout_every}) must be multiples of every ({every})")
    model.train()
    adaptive_opt = optimizer in ("adam", "adamw", "poprisk")
    if lr is None:
        if adaptive_opt:
            raise ValueError(f"optimizer={optimizer} needs an explicit lr")
        lr = gd_step_size(initial_kernel(model, x), step_size)
    opt = build_optimizer(optimizer, model.parameters(), lr, weight_decay, None if full_batch else batch_size, n)
    rec = PathRecorder(model, x, y, x_query, y_query, y_clean=y_clean, window=window, optimizer=opt)
    rec.start()
    gen = torch.Generator().manual_seed(seed)
    state = {"perm": torch.randperm(n, generator=gen), "cursor": 0, "idx": None, "lr": lr, "scalars": {}}
    readouts, rows = [], []
    kw = readout_kwargs or {}

    def loss(k: int) -> Tensor:
        if full_batch:
            state["idx"] = None
            return half_mse(model(x), y)
        if state["cursor"] + batch_size > n:
            state["perm"], state["cursor"] = torch.randperm(n, generator=gen), 0
        idx = state["idx"] = state["perm"][state["cursor"]:state["cursor"] + batch_size]
        state["cursor"] += batch_size
        return half_mse(model(x[idx]), y[idx])

    def after_update(k: int, loss_value: float) -> None:
        step = k + 1                          # the recorder counts updates: step 1 is after the first
        if step % every == 0:
            state["scalars"] = rec.step(state["lr"], steps=every, batch=state["idx"])
            if run is not None and step % readout_every:
                run.log(step, **{name: v for name, v in state["scalars"].items() if math.isfinite(v)})
            if adaptive and not adaptive_opt:
                state["lr"] = gd_step_size(rec.kernel(), step_size)
                for group in opt.param_groups:
                    group["lr"] = state["lr"]
        if step % readout_every == 0:
            _readout(step)

    def _readout(step: int) -> None:
        r = rec.readout(**kw)
        row = {"lr": state["lr"], **state["scalars"], **r.scalars()}
        with torch.no_grad():
            model.eval()
            out_S = model(x)
            row["train_error"] = sign_error(out_S, y) if y.shape[1] == 1 else float("nan")
            if x_test is not None:
                out_T = model(x_test)
                row["test_loss"] = float(half_mse(out_T, y_test))
                row["test_error"] = sign_error(out_T, y_test) if y_test.shape[1] == 1 else float("nan")
            model.train()
        if on_readout is not None:
            on_readout(step, rec, r, row)
        row = {k: float(v) for k, v in row.items()}
        rows.append({"step": step, **row})
        if run is not None:
            run.log(step, **{name: v for name, v in row.items() if math.isfinite(v)})
            run.log_array(step, "W_spectrum", r.eigenvalues)
        if keep_readouts:
            readouts.append((step, r))

    driver = _stopping_driver(stopping, model, x, y, EntryRecorder(rec, lambda: state["scalars"]))
    stop_every = readout_every if stop_every is None else stop_every
    if driver is not None and (stop_every <= 0 or stop_every % every):
        raise ValueError(f"stop_every ({stop_every}) must be a positive multiple of every ({every})")
    fed = never if driver is None else (lambda step: step > 0 and step % stop_every == 0)
    loop = TrainingLoop(model, opt, steps, readout_every, loss, no_evaluation, watch="", eval_at=fed,
                        on_step=after_update, probes=probes, probe_batch=(x[:256], y[:256]), probe_loss=half_mse,
                        probe_prefix=probe_prefix, stopping=driver)
    train(run if probe_run is None else probe_run, loop)
    if loop.stopped_at < steps and loop.stopped_at % readout_every:
        _readout(loop.stopped_at)
    lr = state["lr"]
    return RecordedRun(rec, readouts, rows, float(lr), loop.stop_result())


def _stopping_driver(cfg, model: nn.Module, x: Tensor, y: Tensor, recorder: EntryRecorder):
    """The StoppingDriver of ``cfg``'s rule (``None`` without one) on the training set ``(x, y)``."""
    if cfg is None or cfg.stopping == "none":
        return None
    from lmech.experiments.stopping_keys import stopping_driver

    return stopping_driver(cfg, model, half_mse, (x, y), recorder=lambda: recorder)


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length sequences (``nan`` if either is constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
