r"""Kernel ridge regression learning curves: the eigenlearning prediction against brute-force KRR.

Theory: :mod:`lmech.theory.kernels` (Simon, Dickens, Karkada & DeWeese 2023; Bordelon, Canatar &
Pehlevan 2020; research notes 1.4). From the kernel's eigenvalues :math:`\lambda_i` and the
target's coefficients :math:`v_i` alone, the eigenlearning equations predict the test MSE of KRR
with ridge :math:`\delta` at every sample size :math:`n`.

Protocol (identical for both tasks). A *pool* of :math:`N` points is the data distribution
(uniform measure on the pool), so its Mercer decomposition is exact: :math:`\lambda_i` and
:math:`\phi_i` come from one eigendecomposition of the :math:`N\times N` Gram matrix
(:func:`~lmech.theory.kernels.pool_eigensystem`). The measurement averages, over ``trials``
random training sets of :math:`n` distinct pool points, the KRR test MSE over the whole pool
(the population risk), with label noise :math:`\varepsilon` added to training labels and
:math:`\varepsilon^2` to the error (noisy-test-label convention). *Decision:* training sets are
drawn without replacement and :math:`n \le N/8`: with replacement, duplicates at
:math:`n \sim N` made the empirical error deviate from the (continuous-data) theory by up to 34%;
without replacement at :math:`n = N/4` it read 10% low (measured, N = 2000); at :math:`n\le N/8`
both effects were within the trial noise.

Tasks:

* ``synthetic``: :math:`x` uniform on :math:`S^{d-1}` (``synthetic_dim``), target
  :math:`f(x) = \sin(2x_1) + x_2x_3`, label noise ``synthetic_noise``, kernel
  ``synthetic_kernel`` (Laplace :math:`e^{-\lVert x-x'\rVert/\ell}` by default, ``bandwidth``);
* ``mnist1d``: ``mnist_pool`` MNIST-1D inputs (standardized, divided by :math:`\sqrt{40}` so that
  :math:`\lVert x\rVert\approx1`), targets the centered one-hot labels (10 columns, errors summed),
  no added noise, kernel ``mnist_kernel``: Laplace with the median pairwise distance as bandwidth
  by default (Gaussian likewise), or the infinite-width NTK of a two-layer ReLU network
  (:func:`~lmech.theory.kernels.relu_ntk`). *Decision:* Laplace by default because its learning
  curve is informative (test MSE 0.98 -> 0.69 over n = 8..256, theory within 1%); with the ReLU NTK
  and ridge 1e-3 KRR barely beats the zero predictor here (test MSE 1.02-1.13, theory 3.5-4.6% low,
  ``--set mnist_kernel=relu_ntk``).

Check: relative error of the predicted test MSE within ``tolerance`` (10%, the issue's target)
at every :math:`n \ge` ``n_min`` on both tasks (the theory is asymptotic; the notes expect
5-10% once :math:`n \gtrsim 20`).

Measured limits of the theory (so that a reader knows where the 10% holds): with smooth kernels
on low-dimensional data the prediction is worse at moderate :math:`n`. On :math:`S^4` with the
ReLU NTK the brute force read 11% above the theory at :math:`n = 24` (600 trials, standard error
1.3%), where :math:`n` crosses the 20-dimensional block of spherical harmonics of degree
:math:`\le 2`; a Gaussian kernel of bandwidth 0.5 read 18% high at :math:`n = 64`; the ReLU NTK on
Gaussian inputs in :math:`\mathbb R^5` read 11-15% high at :math:`n = 64`-128; without label noise
and ridge :math:`10^{-2}` the Laplace kernel on :math:`S^4` read 12% high at :math:`n = 256`. This is
the known failure of the spectral-bias prediction on low-dimensional data (Tomasini, Sclocchi &
Wyart, ICML 2022). The defaults (Laplace kernels; label noise on :math:`S^4`) agreed within 8% in
every run made while writing this (300-trial means: 3-8% high at n = 28-112 on :math:`S^4`), so
``trials`` is 200: with 30 trials the standard error (5%) alone made the 10% check flaky.
``--set synthetic_kernel=relu_ntk`` reproduces the deviation.

``quick``: pools of 1,000, :math:`n \in \{16, 28, 56, 112\}`, 150 trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmech.core.threads import blas_threads
from lmech.experiments.laws import parse_list
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.tasks import mnist1d
from lmech.theory import kernels as kr

Kernel = Literal["laplace", "rbf", "relu_ntk"]


@dataclass
class KernelCurvesConfig:
    ns: str = "8,16,32,64,128,250"
    trials: int = 200
    ridge: float = 1e-3
    n_min: int = 16
    tolerance: float = 0.10
    synthetic_pool: int = 2000
    synthetic_dim: int = 5
    synthetic_kernel: Kernel = "laplace"
    bandwidth: float = 1.0
    synthetic_noise: float = 0.1
    mnist_pool: int = 2000
    mnist_kernel: Kernel = "laplace"

    def validate(self) -> None:
        ns = parse_list(self.ns, int, "ns")
        require(all(n >= 2 for n in ns), "every n must be >= 2")
        require(max(ns) <= min(self.synthetic_pool, self.mnist_pool) // 8,
                f"largest n ({max(ns)}) must be <= pool/8 = {min(self.synthetic_pool, self.mnist_pool) // 8} "
                "(larger fractions of the pool bias the measurement; see the docstring)")
        require(self.trials >= 2, "trials must be >= 2 (the standard error needs two)")
        require(self.ridge > 0, "ridge must be > 0")
        require(any(n >= self.n_min for n in ns), f"no n >= n_min={self.n_min} to check")
        require(self.tolerance > 0 and self.bandwidth > 0 and self.synthetic_noise >= 0, "tolerance, bandwidth > 0")
        require(self.synthetic_dim >= 3, "synthetic_dim must be >= 3 (the target uses x_1, x_2, x_3)")


def gram(kind: str, x: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gram matrix of ``x`` for a kernel name; ``bandwidth=None`` means the median pairwise distance."""
    if kind == "relu_ntk":
        return kr.relu_ntk(x, x)
    if bandwidth is None:
        sq = np.sum(x ** 2, 1)
        dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None))
        bandwidth = float(np.median(dist[np.triu_indices(len(x), 1)]))
    return kr.laplace_kernel(x, x, bandwidth) if kind == "laplace" else kr.rbf_kernel(x, x, bandwidth)


def synthetic_task(cfg: KernelCurvesConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((cfg.synthetic_pool, cfg.synthetic_dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]


def mnist1d_task(cfg: KernelCurvesConfig) -> tuple[np.ndarray, np.ndarray]:
    data = mnist1d(n_train=cfg.mnist_pool, n_test=10)
    x = data.x_train.numpy().astype(np.float64) / np.sqrt(data.x_train.shape[1])
    y = np.eye(10)[data.y_train.numpy()]
    return x, y - y.mean(axis=0)


def curve(g: np.ndarray, target: np.ndarray, ns: list[int], ridge: float, noise: float, trials: int, seed: int) -> dict:
    """Theory and brute force on one pool."""
    lam, phi = kr.pool_eigensystem(g)
    v = kr.target_coefficients(phi, target)
    theory = np.array([p.test_mse for p in kr.learning_curve(lam, v, ns, ridge=ridge, noise=noise)])
    emp = kr.empirical_learning_curve(g, target, ns, ridge=ridge, noise=noise, trials=trials, seed=seed)
    power = (v ** 2).reshape(len(lam), -1).sum(1)
    return {"theory": theory, "measured": emp["test_mse"], "sem": emp["test_mse_sem"], "eigenvalues": lam,
            "target_power": power}


def run(cfg: KernelCurvesConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: KernelCurvesConfig, run, seed: int) -> dict:
    ns = sorted(parse_list(cfg.ns, int))
    tasks = {}
    x, f = synthetic_task(cfg, seed)
    tasks["synthetic"] = curve(gram(cfg.synthetic_kernel, x, cfg.bandwidth), f, ns, cfg.ridge, cfg.synthetic_noise,
                               cfg.trials, seed)
    x, y = mnist1d_task(cfg)
    tasks["mnist1d"] = curve(gram(cfg.mnist_kernel, x), y, ns, cfg.ridge, 0.0, cfg.trials, seed + 1)
    result: dict = {"ns": ns, "n_min": cfg.n_min, "tolerance": cfg.tolerance,
                    "kernels": {"synthetic": cfg.synthetic_kernel, "mnist1d": cfg.mnist_kernel}}
    for name, res in tasks.items():
        for i, n in enumerate(ns):
            run.log(n, **{f"{name}/test_mse_theory": res["theory"][i], f"{name}/test_mse_measured": res["measured"][i],
                          f"{name}/test_mse_sem": res["sem"][i]})
        result[f"{name}.theory"] = res["theory"].tolist()
        result[f"{name}.measured"] = res["measured"].tolist()
        result[f"{name}.sem"] = res["sem"].tolist()
        result[f"{name}.max_rel_err"] = float(np.max(np.abs(res["measured"] - res["theory"]) / res["theory"]))
    _save_figure(run, cfg, ns, tasks)
    return result


def check(result: dict) -> list[CheckRow]:
    rows = []
    for name in ("synthetic", "mnist1d"):
        kernel = result["kernels"][name]
        for n, pred, meas in zip(result["ns"], result[f"{name}.theory"], result[f"{name}.measured"]):
            if n >= result["n_min"]:
                rows.append(CheckRow.relative(f"{name} ({kernel}) KRR test MSE, n={n}", pred, meas, result["tolerance"]))
    return rows


def _save_figure(run, cfg: KernelCurvesConfig, ns: list[int], tasks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4))
    labels = {"synthetic": f"S^{cfg.synthetic_dim - 1}, {cfg.synthetic_kernel}, noise {cfg.synthetic_noise:g}",
              "mnist1d": f"MNIST-1D, {cfg.mnist_kernel}, one-hot"}
    for ax, (name, res) in zip(axes[:2], tasks.items()):
        ax.plot(ns, res["theory"], "k-", label="eigenlearning theory")
        ax.errorbar(ns, res["measured"], yerr=res["sem"], fmt="o", color="C1", capsize=3,
                    label=f"KRR, mean of {cfg.trials} draws")
        ax.set(xscale="log", yscale="log", xlabel="n (training samples)", ylabel="test MSE", title=labels[name])
        ax.legend(fontsize=8)
    ax = axes[2]
    for name, res in tasks.items():
        lam = res["eigenvalues"]
        k = np.arange(1, len(lam) + 1)
        ax.loglog(k, lam / lam[0], label=f"{name}: eigenvalues / lambda_1")
        ax.loglog(k, 1 - np.cumsum(res["target_power"]) / res["target_power"].sum() + 1e-16, ls="--",
                  label=f"{name}: target power beyond mode i")
    ax.set(xlabel="mode i", title="kernel spectra and target alignment", ylim=(1e-8, 2))
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    run.save_figure(fig, "kernel-curves")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="kernel-curves",
    summary="KRR learning curves predicted from the kernel spectrum (eigenlearning), synthetic sphere and MNIST-1D",
    config=KernelCurvesConfig,
    run=run,
    check=check,
    quick={"ns": "16,28,56,112", "trials": 150, "synthetic_pool": 1000, "mnist_pool": 1000},
)
