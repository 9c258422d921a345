r"""Grokking as signal migrating from the reservoir into the channel (Litman & Guo 2026, Fig. 1;
notes ``shared/research/generalization-theory.md`` 1.3 and check 8).

Task: sparse parity :math:`y = x_1x_2x_3` on :math:`x \in \{\pm1\}^{d}` (``d`` = 14), ``n_train``
= 300 random training strings, +-1 targets, squared loss; a one-hidden-layer ReLU MLP trained
full batch with AdamW and weight decay (defaults: lr 1e-3, weight decay 1). Memorization
(training accuracy 1) comes within a few hundred steps and held-out accuracy jumps from chance to 1
much later: delayed generalization (grokking) with a scalar output, so that the output space of
the training set stays small (:math:`N = n`).

A :class:`lmech.probes.gramian.PathRecorder` runs along the whole path (Adam's preconditioner; the
momentum and the decoupled weight decay are the documented approximations, measured by
``lin_error``) with tumbling windows of ``window`` steps. For each window
:math:`[t, t+\Delta]` its Gramian :math:`W_S(t, t+\Delta)` says which output directions the
dynamics of that window can move. The *signal* is the target :math:`y` itself (what generalizing
means on the training set); per window we log

* ``signal_channel_fraction``: the fraction of :math:`\|y\|^2` on eigenvectors of the window's
  :math:`W_S` above the frozen cut :math:`\frac n2(1-e^{-2})` (directions along which the window's
  dynamics would dissipate at least 86.5% of the loss; with the momentum carried in parameter
  space the saturation :math:`n/2` holds for Adam too);
* ``signal_transfer``: the cosine between the query displacement the window produces when the
  training residual is the target (:math:`g = -y/n`, displacement :math:`G_Q y/n`) and the query
  targets :math:`y_Q`: does moving the training outputs toward the target move held-out outputs
  toward theirs;
* ``target_alignment``: centered kernel-target alignment of the window's last driving kernel
  (Adam-preconditioned).

The question of the notes (check 8): does the signal enter the channel before held-out accuracy
jumps? Checks: the run groks (held-out accuracy >= 0.95 at the end); the first window with half
of the signal in its channel, and the first whose ``signal_transfer`` reaches
``transfer_threshold``, end no later than the first evaluation at which held-out accuracy reaches
0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmech.experiments.loop import ProbeLevel
from lmech.experiments.signal_runs import record_training, sign_error
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.models import MLP
from lmech.probes.ntk import kernel_target_alignment
from lmech.tasks.base import numpy_rng


@dataclass
class GrokkingChannelConfig:
    d: int = 14
    k: int = 3
    n_train: int = 300
    n_query: int = 200
    n_test: int = 2000
    width: int = 128
    lr: float = 1e-3
    weight_decay: float = 1.0
    steps: int = 2400
    every: int = 5
    window: int = 100
    transfer_threshold: float = 0.5
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) every readout

    def validate(self) -> None:
        require(1 <= self.k <= self.d, "need 1 <= k <= d")
        require(self.n_train >= 8 and 2 <= self.n_query <= self.n_test, "n_train >= 8 and 2 <= n_query <= n_test")
        require(self.width > 0 and self.lr > 0 and self.weight_decay >= 0, "width, lr > 0 and weight_decay >= 0")
        require(self.every >= 1 and self.window % self.every == 0 and self.steps % self.window == 0,
                "every must divide window, and window must divide steps")
        require(-1 < self.transfer_threshold < 1, "transfer_threshold must be in (-1, 1)")


def _parity(cfg: GrokkingChannelConfig, seed: int):
    rng = numpy_rng(seed, 7)
    X = rng.integers(0, 2, size=(cfg.n_train + cfg.n_test, cfg.d)) * 2.0 - 1.0
    Y = X[:, :cfg.k].prod(1, keepdims=True)
    X, Y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    return X[:cfg.n_train], Y[:cfg.n_train], X[cfg.n_train:], Y[cfg.n_train:]


def run(cfg: GrokkingChannelConfig, run, seed: int) -> dict:
    x, y, xt, yt = _parity(cfg, seed)
    xq, yq = xt[:cfg.n_query], yt[:cfg.n_query]
    torch.manual_seed(seed)
    model = MLP(cfg.d, 1, width=cfg.width, depth=1, activation="relu")
    windows: list[dict] = []

    def on_readout(step, rec, r, row):
        w = rec.last_window
        if w is None or w.u_S_end is None:
            return
        wr = rec.readout(w)
        e = wr.split.energies(y.double().reshape(-1))
        # residual -y (outputs at 0): g = -y / n, query displacement -G g = G y / n
        g_y = w.G @ y.double().reshape(-1)
        cos = float(g_y @ yq.double().reshape(-1) / (g_y.norm() * yq.double().norm()).clamp_min(1e-300))
        row.update(signal_channel_fraction=e["channel"] / e["total"], signal_transfer=cos,
                   window_n_channel=wr.split.n_channel, window_coupling_corr=wr.coupling_corr,
                   target_alignment=kernel_target_alignment(rec.K_last, y.reshape(-1)))
        windows.append(dict(step=step, spectrum=wr.eigenvalues, cut=wr.split.cutoff))

    rr = record_training(model, x, y, xq, yq, optimizer="adamw", lr=cfg.lr, steps=cfg.steps, every=cfg.every,
                         readout_every=cfg.window, run=run, x_test=xt, y_test=yt, weight_decay=cfg.weight_decay,
                         window=cfg.window, seed=seed, on_readout=on_readout, keep_readouts=False,
                         probes=cfg.probes)
    rows = rr.rows
    for r in rows:
        r["test_acc"] = 1 - r["test_error"]
        r["train_acc"] = 1 - r["train_error"]
    steps = [r["step"] for r in rows]
    acc = [r["test_acc"] for r in rows]
    first = lambda cond: next((s for s, c in zip(steps, cond) if c), None)  # noqa: E731
    step_90 = first([a >= 0.9 for a in acc])
    step_mem = first([r["train_acc"] >= 1.0 for r in rows])
    step_transfer = first([r.get("signal_transfer", -2) >= cfg.transfer_threshold for r in rows])
    step_channel = first([r.get("signal_channel_fraction", -1) >= 0.5 for r in rows])
    from lmech.experiments.figures.signal_reservoir import grokking_channel_figure

    run.save_figure(grokking_channel_figure(rows, windows, dict(memorized=step_mem, channel_half=step_channel,
                                                                transfer=step_transfer, test_90=step_90)), "grokking_channel")
    with torch.no_grad():
        final_acc = 1 - sign_error(model(xt), yt)
    return {
        "step_memorized": step_mem, "step_test_90": step_90, "step_signal_transfer": step_transfer,
        "step_signal_channel_half": step_channel,
        "final_test_acc": final_acc, "max_lin_error": max(r["lin_error"] for r in rows),
        "signal_transfer": [r.get("signal_transfer") for r in rows],
        "signal_channel_fraction": [r.get("signal_channel_fraction") for r in rows],
        "test_acc": acc, "steps": steps,
    }


def check(result: dict) -> list[CheckRow]:
    s90 = result.get("step_test_90")
    lead = lambda key: None if (s90 is None or result.get(key) is None) else float(s90 - result[key])  # noqa: E731
    return [
        CheckRow.at_least("final held-out accuracy (grokked)", 0.95, result.get("final_test_acc")),
        CheckRow.at_least("steps by which half the signal is in the window channel before 90% held-out accuracy",
                          0.0, lead("step_signal_channel_half")),
        CheckRow.at_least("steps by which signal transfer precedes 90% held-out accuracy", 0.0,
                          lead("step_signal_transfer")),
    ]


EXPERIMENT = Experiment(
    name="grokking-channel",
    summary="sparse parity grokking: does the signal enter the channel before held-out accuracy jumps?",
    config=GrokkingChannelConfig,
    run=run,
    check=check,
    quick={"d": 10, "n_train": 200, "width": 64, "steps": 1500, "window": 100},
)
