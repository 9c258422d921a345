r"""Label noise in the signal channel and the reservoir (Litman & Guo 2026, Sec. 3 and Fig. 1;
notes ``shared/research/generalization-theory.md`` 1.3, 1.6 and checks 5 and 11).

A binary task with +-1 targets (:func:`lmech.experiments.signal_runs.binary_task`: sklearn digits
``>= 5`` by default) has a fraction ``noise`` = :math:`q` of its training labels flipped. An MLP is
trained on the squared loss with a :class:`lmech.probes.gramian.PathRecorder` attached. The
initial residual :math:`r_0 = u_0 - y` splits into a clean part :math:`u_0 - y_\text{clean}`
("signal") and a label-noise part :math:`y_\text{clean} - y` ("noise"); each is projected on the
eigenvectors of the cumulative dissipation Gramian :math:`W_S(0, t)`, above the cut (channel:
directions training dissipated) or below it (reservoir), giving the four cells
{signal, noise} x {channel, reservoir} over training. Energies are per example
(:math:`\|\Pi v\|^2/n`).

Logged at every record: the recorder's step scalars, including the validation-free
population-risk estimates: the leave-one-out estimates along the path ``poprisk_loo`` (path
leverage) and ``poprisk_gcv`` (path GCV) of :mod:`lmech.probes.path_loo`, and the instantaneous
U-statistic reconstruction ``poprisk_ustat`` / ``poprisk_ustat_path`` (module docstring of
:mod:`lmech.probes.gramian`); at every readout: the four cells and fractions, the cut and the gap
around it, test error and loss (clean test labels), ``heldout_noisy_loss`` (test labels with the
same noise rate: the population the estimate targets, never seen by it), coupling and dissipation
readouts and ``noise_transfer`` (:math:`\|G_Q g_\text{noise}\|^2/m`, the query-output displacement
the label noise caused, by linear response).

Checks (per run): with gradient descent, the coupling :math:`A\,\Delta U_S` vs :math:`\Delta U_Q`
(correlation >= 0.99); with noise, the noise starts more in the reservoir than the signal does (the
reservoir fraction of the noise energy exceeds that of the clean residual at the first readout);
and the paper's validation-free claim for the leave-one-out estimates (``poprisk_loo`` and
``poprisk_gcv``, each): correlation over training with the held-out noisy loss >= 0.9, and final
level within 25% of it (tolerances fixed before the first run of these estimates). The study over
:math:`q` (a sweep: the table and figure of docs/results/signal-reservoir.md) is
``scripts/label_noise_table.py``; an entry runs once.

``optimizer``: ``gd`` is full-batch gradient descent, ``sgd`` the same on minibatches of
``batch_size`` (required), ``adam`` and ``poprisk`` take ``lr`` (default 1e-3; full batch unless
``batch_size``). ``every``: the
recording interval of full-batch runs (the kernel is frozen in between); minibatch runs are
recorded every step.

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`; every rule): fed at every
readout (``stop_patience`` counts readouts), on the training set only. The path rules read the
recorder above (not a second one): ``poprisk_loo``/``poprisk_gcv`` (``path_loo``, ``path_gcv``) and
the channel-noise risk of its :math:`W_S` (``channel_noise``), the gradient rules
:func:`lmech.stopping.gradient_signals` with :func:`half_mse` on all ``n_train`` noisy-label
examples; none reads the test or query labels. Training ends at the readout where the rule fires:
the ``final_*`` results and the checks are those of that readout, and the result adds
``stop/rule``, ``stop/step`` and ``stop/best_step``.

Made to back the interactive label-noise playground: one run (any ``noise``, ``optimizer``,
``task``) takes seconds to a minute and logs its energies to the run store as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lmech.experiments.loop import ProbeLevel
from lmech.experiments.signal_runs import BINARY_TASKS, binary_task, pearson, record_training
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.stopping_keys import STOPPING_RULES, StoppingKeys, validate_stopping_keys
from lmech.models import MLP
from lmech.probes.gramian import half_mse

CELLS = ("signal_channel", "signal_reservoir", "noise_channel", "noise_reservoir")


@dataclass
class LabelNoiseConfig(StoppingKeys):
    task: Literal["digits", "mnist1d", "teacher"] = "digits"
    noise: float = 0.2
    n_train: int = 256
    n_query: int = 128
    width: int = 128
    depth: int = 1
    activation: Literal["relu", "tanh"] = "relu"
    optimizer: Literal["gd", "sgd", "adam", "poprisk"] = "gd"
    lr: float = 0.0
    step_size: float = 0.3
    batch_size: int = 0
    weight_decay: float = 0.0
    steps: int = 800
    every: int = 5
    readout_every: int = 40
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) every readout

    def validate(self) -> None:
        require(self.task in BINARY_TASKS, f"task must be one of {', '.join(BINARY_TASKS)}")
        require(0.0 <= self.noise < 0.5, f"noise (flip fraction q) must be in [0, 0.5), got {self.noise}")
        require(self.n_train >= 8 and self.n_query >= 2, "n_train must be >= 8 and n_query >= 2")
        require(self.width > 0 and self.depth > 0, "width and depth must be positive")
        require(self.lr >= 0, "lr must be >= 0 (0: automatic)")
        require(0 < self.step_size < 2, "step_size (eta lambda_max / n for gd/sgd) must be in (0, 2)")
        require(self.weight_decay >= 0, "weight_decay must be >= 0")
        require(self.batch_size >= 0, "batch_size must be >= 0 (0: full batch)")
        require(self.optimizer != "sgd" or 0 < self.batch_size < self.n_train,
                "optimizer=sgd needs 0 < batch_size < n_train (optimizer=gd is full batch)")
        require(self.every >= 1 and self.steps % self.every == 0 and self.readout_every % self.every == 0,
                "every must be >= 1 and divide steps and readout_every")
        require(self.steps >= self.readout_every > 0, "need steps >= readout_every > 0")
        validate_stopping_keys(self, STOPPING_RULES, self.n_train)


def _lr(cfg: LabelNoiseConfig) -> float | None:
    if cfg.lr > 0:
        return cfg.lr
    return None if cfg.optimizer in ("gd", "sgd") else 1e-3


def run(cfg: LabelNoiseConfig, run, seed: int) -> dict:
    data = binary_task(cfg.task, cfg.n_train, cfg.n_query, cfg.noise, seed)
    torch.manual_seed(seed)
    model = MLP(data.x.shape[1], 1, width=cfg.width, depth=cfg.depth, activation=cfg.activation)
    n = cfg.n_train

    def on_readout(step, rec, r, row):
        e = r.energies
        for part, name in (("clean", "signal"), ("noise", "noise")):
            if part in e:
                row[f"{name}_channel"] = e[part]["channel"] / n
                row[f"{name}_reservoir"] = e[part]["reservoir"] / n
                row[f"{name}_channel_soft"] = e[part]["channel_soft"] / n
        with torch.no_grad():
            model.eval()
            row["heldout_noisy_loss"] = float(half_mse(model(data.x_test), data.y_test_noisy))
            model.train()

    minibatch = 0 < cfg.batch_size < n
    rr = record_training(model, data.x, data.y, data.x_query, data.y_query_noisy, optimizer=cfg.optimizer,
                         lr=_lr(cfg), steps=cfg.steps, every=1 if minibatch else cfg.every,
                         readout_every=cfg.readout_every, run=run,
                         y_clean=data.y_clean, x_test=data.x_test, y_test=data.y_test,
                         weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, step_size=cfg.step_size,
                         seed=seed, on_readout=on_readout, probes=cfg.probes, stopping=cfg)
    rows = rr.rows
    final_step, final = rr.readouts[-1]
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    result = {
        "noise": cfg.noise, "optimizer": cfg.optimizer, "task": cfg.task, "lr": rr.lr, "n_train": n,
        "n_corrupted": data.info["n_corrupted"], "steps": cfg.steps,
        "final_test_error": rows[-1]["test_error"], "min_test_error": min(col("test_error")),
        "final_train_error": rows[-1]["train_error"], "final_test_loss": rows[-1]["test_loss"],
        "final_heldout_noisy_loss": rows[-1]["heldout_noisy_loss"],
        "signal_reservoir_fraction_first": rows[0]["clean_reservoir_fraction"],
        "signal_reservoir_fraction_final": rows[-1]["clean_reservoir_fraction"],
        "coupling_corr": final.coupling_corr, "coupling_rel_err": final.coupling_rel_err,
        "dissipation_rel_err": final.dissipation_rel_err, "max_lin_error": max(col("lin_error")),
        "n_channel": final.split.n_channel, "cutoff": final.split.cutoff, "gap_ratio": final.split.gap_ratio,
        "near_cut_fraction": final.split.near_cut_fraction, "drift": final.drift_op,
        "train_loss_corr_heldout": pearson(col("loss"), col("heldout_noisy_loss")),
        **rr.stop,
    }
    heldout = rows[-1]["heldout_noisy_loss"]
    for name in ("poprisk_loo", "poprisk_gcv", "poprisk_ustat", "poprisk_ustat_path"):
        result[f"{name}_final"] = rows[-1][name]
        result[f"{name}_corr_heldout"] = pearson(col(name), col("heldout_noisy_loss"))
        result[f"{name}_rel_err_final"] = abs(rows[-1][name] - heldout) / heldout
    if cfg.noise > 0:
        result.update({
            "noise_reservoir_fraction_first": rows[0]["noise_reservoir_fraction"],
            "noise_reservoir_fraction_final": rows[-1]["noise_reservoir_fraction"],
            "noise_channel_final": rows[-1]["noise_channel"],
            "noise_channel_soft_final": rows[-1]["noise_channel_soft"],
            "noise_transfer_final": rows[-1]["noise_transfer"],
            "test_error_corr_noise_channel": pearson(col("test_error"), col("noise_channel")),
        })
    from lmech.experiments.figures.signal_reservoir import label_noise_figure

    title = f"{cfg.task}, q = {cfg.noise:g}, {cfg.optimizer}, width {cfg.width}, n = {n}"
    run.save_figure(label_noise_figure(rows, final.split, final.extras["projections"], title), "label_noise")
    return result


def check(result: dict) -> list[CheckRow]:
    rows = []
    if result.get("optimizer") in ("gd", "sgd"):
        rows.append(CheckRow.at_least("corr(A dU_S, dU_Q) (Thm 5.1)", 0.99, result["coupling_corr"]))
    if result.get("noise", 0) > 0:
        rows.append(CheckRow.at_least("noise reservoir fraction - signal reservoir fraction (first readout)", 0.0,
                                      result["noise_reservoir_fraction_first"] - result["signal_reservoir_fraction_first"]))
    for name, label in (("poprisk_loo", "path-leverage LOO"), ("poprisk_gcv", "path GCV")):
        rows.append(CheckRow.at_least(f"corr over training({label} estimate, held-out noisy loss)", 0.9,
                                      result[f"{name}_corr_heldout"]))
        rows.append(CheckRow.at_most(f"|{label} estimate - held-out noisy loss| / held-out (final)", 0.25,
                                     result[f"{name}_rel_err_final"]))
    return rows


EXPERIMENT = Experiment(
    name="label-noise",
    summary="label noise q in the signal channel vs the reservoir: four-cell decomposition, test error, "
            "population-risk estimate",
    config=LabelNoiseConfig,
    run=run,
    check=check,
    quick={"n_train": 128, "n_query": 64, "width": 64, "steps": 200, "readout_every": 20},
)
