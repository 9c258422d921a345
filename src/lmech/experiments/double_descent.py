r"""Model-wise double descent through the signal channel (Litman & Guo 2026, App. H / Fig. 1;
notes ``shared/research/generalization-theory.md`` 1.3 and check 6).

MNIST-1D digits 0 vs 1 (+-1 targets, :func:`lmech.experiments.signal_runs.binary_task`), a fraction
``noise`` of the training labels flipped, one-hidden-layer ReLU MLPs of every width in ``widths``
trained by full-batch gradient descent on the squared loss for the same number of steps (fixed step
size :math:`\eta = c\,n/\lambda_{\max}(K_0)`). The interpolation threshold sits near
:math:`P \approx n` parameters (:math:`P = 42\,\text{width} + 1` here). One run sweeps all widths
(logged with ``step`` = width) so that ``check()`` can compare where the peaks are.

Per width, from :class:`lmech.probes.gramian.PathRecorder` at the end of training: the label-noise
energy in the channel and in the reservoir (frozen cut, and the cutoff-free dissipated fraction),
the noise energy on *small but nonzero* eigenvalues of :math:`W_S` (the band
:math:`[10^{-3}c, c)` below the cut :math:`c`: partially fitted directions), and
``noise_transfer`` :math:`\|G_Q g_\text{noise}\|^2/m`, the query-output displacement the label
noise caused (linear response along the realized path).

Checks (notes check 6, operationalized): the test-loss peak over widths is interior (double
descent is there: the peak exceeds both ends by 20%), and the widths of the maximum test loss and
of the maximum noise transfer, and of the maximum noise band energy, are at most one grid step
apart.

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`; every rule): each width's
training has its own rule, fed at every record (every ``every`` steps; ``stop_patience`` counts
records) on the training set only, through that width's recorder
(:func:`lmech.experiments.signal_runs.record_training`); its signals are logged as
``w<width>/stop/...`` columns at the training steps. A width whose rule fires ends there and is read
out at that step, so the table is the early-stopped one (does stopping flatten the peak?); the
result adds ``stop/rule`` and, per width, ``stop/step`` (``None``: ran to ``steps``) and
``stop/best_step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmech.experiments.loop import ProbeLevel
from lmech.experiments.signal_runs import binary_task, record_training
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.stopping_keys import STOPPING_RULES, StoppingKeys, validate_stopping_keys
from lmech.errors import ConfigError
from lmech.models import MLP
from lmech.probes.gramian import half_mse


@dataclass
class DoubleDescentConfig(StoppingKeys):
    widths: str = "1,2,4,6,8,12,16,32,64,128"
    noise: float = 0.2
    n_train: int = 256
    n_query: int = 128
    step_size: float = 0.5
    steps: int = 4000
    every: int = 10
    band: float = 1e-3
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) at the end

    def width_list(self) -> list[int]:
        try:
            ws = [int(w) for w in str(self.widths).split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"widths must be comma-separated integers, got {self.widths!r}") from None
        return ws

    def validate(self) -> None:
        ws = self.width_list()
        require(len(ws) >= 3 and all(w > 0 for w in ws) and ws == sorted(set(ws)),
                "widths must be at least 3 increasing positive integers, e.g. 1,4,16")
        require(0 <= self.noise < 0.5, "noise must be in [0, 0.5)")
        require(self.n_train >= 8 and self.n_query >= 2, "n_train must be >= 8 and n_query >= 2")
        require(0 < self.step_size < 2, "step_size (eta lambda_max / n) must be in (0, 2)")
        require(self.every >= 1 and self.steps % self.every == 0, "every must divide steps")
        require(0 < self.band < 1, "band must be in (0, 1)")
        validate_stopping_keys(self, STOPPING_RULES, self.n_train)


def run(cfg: DoubleDescentConfig, run, seed: int) -> dict:
    data = binary_task("mnist1d", cfg.n_train, cfg.n_query, cfg.noise, seed)
    n = cfg.n_train
    table, spectra, stops = [], [], []
    for width in cfg.width_list():
        torch.manual_seed(seed)
        model = MLP(data.x.shape[1], 1, width=width, depth=1, activation="relu")
        rr = record_training(model, data.x, data.y, data.x_query, data.y_query, optimizer="gd", lr=None,
                             steps=cfg.steps, every=cfg.every, readout_every=cfg.steps, run=None,
                             y_clean=data.y_clean, x_test=data.x_test, y_test=data.y_test, step_size=cfg.step_size,
                             seed=seed, probes=cfg.probes, probe_prefix=f"w{width}/", probe_run=run,
                             stopping=cfg, stop_every=cfg.every)
        stops.append(rr.stop)
        r = rr.readouts[-1][1]
        row = dict(rr.rows[-1])
        split = r.split
        row.update(width=width, params=sum(p.numel() for p in model.parameters()), lr=rr.lr)
        with torch.no_grad():
            row["train_loss_clean"] = float(half_mse(model(data.x), data.y_clean))
        if "noise" in r.energies:
            proj = r.extras["projections"]["noise"]
            ev = split.eigenvalues
            band = (ev < split.cutoff) & (ev >= cfg.band * split.cutoff)
            row["noise_band_energy"] = float(proj[band].sum()) / n
            row["noise_band_fraction"] = float(proj[band].sum() / proj.sum())
            row["noise_channel_energy"] = r.energies["noise"]["channel"] / n
            row["noise_soft_channel_energy"] = r.energies["noise"]["channel_soft"] / n
        table.append(row)
        spectra.append((width, split.eigenvalues, split.cutoff))
        run.log(width, **{k: v for k, v in row.items() if isinstance(v, float) and np.isfinite(v)})
        run.log_array(width, "W_spectrum", split.eigenvalues)
    from lmech.experiments.figures.signal_reservoir import double_descent_figure

    run.save_figure(double_descent_figure(table, spectra, n, cfg.noise), "double_descent")
    widths = [r["width"] for r in table]
    arg = lambda key: int(np.nanargmax([r.get(key, np.nan) for r in table]))  # noqa: E731
    loss = np.array([r["test_loss"] for r in table])
    peak = arg("test_loss")
    result = {
        "widths": widths, "test_loss": loss.tolist(), "test_error": [r["test_error"] for r in table],
        "train_loss": [r["loss"] for r in table], "params": [r["params"] for r in table],
        "peak_width_test_loss": widths[peak], "peak_width_test_error": widths[arg("test_error")],
        "peak_over_ends": float(loss[peak] / max(loss[0], loss[-1])),
    }
    if cfg.noise > 0:
        result.update({
            "noise_transfer": [r["noise_transfer"] for r in table],
            "noise_band_energy": [r["noise_band_energy"] for r in table],
            "noise_reservoir_fraction": [r["noise_reservoir_fraction"] for r in table],
            "peak_width_noise_transfer": widths[arg("noise_transfer")],
            "peak_width_noise_band": widths[arg("noise_band_energy")],
            "grid_steps_loss_vs_transfer": abs(peak - arg("noise_transfer")),
            "grid_steps_loss_vs_band": abs(peak - arg("noise_band_energy")),
        })
    result["coupling_corr_min"] = float(min(r["coupling_corr"] for r in table))
    if cfg.stopping != "none":
        result.update({"stop/rule": cfg.stopping, "stop/step": [s["stop/step"] for s in stops],
                       "stop/best_step": [s["stop/best_step"] for s in stops]})
    return result


def check(result: dict) -> list[CheckRow]:
    rows = [CheckRow.at_least("test-loss peak / max(ends) (double descent present)", 1.2, result["peak_over_ends"])]
    if "grid_steps_loss_vs_transfer" in result:
        rows.append(CheckRow.at_most("grid steps between peaks: test loss vs noise transfer ||G g_noise||^2", 1,
                                     result["grid_steps_loss_vs_transfer"]))
        rows.append(CheckRow.at_most("grid steps between peaks: test loss vs noise on small nonzero omega", 1,
                                     result["grid_steps_loss_vs_band"]))
    return rows


EXPERIMENT = Experiment(
    name="double-descent",
    summary="width sweep through the interpolation threshold (mnist1d, label noise): noise in channel vs reservoir",
    config=DoubleDescentConfig,
    run=run,
    check=check,
    quick={"widths": "1,6,64", "n_train": 128, "n_query": 64, "steps": 1500},
)
