r"""Kernel ridge regression learning curves from the kernel spectrum (eigenlearning).

Sources: Simon, Dickens, Karkada & DeWeese, *The Eigenlearning Framework: A Conservation Law
Perspective on Kernel Regression and Wide Neural Networks* (TMLR 2023, arXiv 2110.03922);
Bordelon, Canatar & Pehlevan, *Spectrum Dependent Learning Curves in Kernel Regression and Wide
Neural Networks* (ICML 2020); the "omniscient risk estimate" of Jacot et al. (2020). Notation
follows shared/research/learning-mechanics.md section 1.4.

Setting
-------
Kernel ridge regression (KRR) on ``n`` samples drawn iid from a distribution :math:`\mu`,

.. math::  \hat f(x) = k(x, X)\,(K_{XX} + \delta I_n)^{-1} y, \qquad y_i = f(x_i) + \epsilon_i,
           \quad \epsilon_i \sim \mathcal N(0, \varepsilon^2),

with the ridge :math:`\delta` added to the *unnormalized* Gram matrix. The kernel's Mercer
decomposition under :math:`\mu` is :math:`K(x,x') = \sum_i \lambda_i \phi_i(x)\phi_i(x')` with
:math:`\mathbb E_\mu[\phi_i\phi_j] = \delta_{ij}`, and the target is
:math:`f = \sum_i v_i \phi_i`.

Eigenlearning equations
-----------------------
* effective regularization :math:`\kappa > 0` solves
  :math:`n = \sum_i \frac{\lambda_i}{\lambda_i + \kappa} + \frac{\delta}{\kappa}`;
* modewise learnability :math:`\mathcal L_i = \lambda_i/(\lambda_i + \kappa) \in [0, 1]`,
  with :math:`\sum_i \mathcal L_i \le n` (the conservation law);
* overfitting coefficient :math:`\mathcal E_0 = n/(n - \sum_i \mathcal L_i^2)`;
* test MSE against noisy test labels
  :math:`\mathcal E_{te} = \mathcal E_0\,(\sum_i (1-\mathcal L_i)^2 v_i^2 + \varepsilon^2)`;
  against the clean target it is :math:`\mathcal E_{te} - \varepsilon^2` (Bordelon et al.'s
  :math:`E_g`);
* train MSE :math:`\mathcal E_{tr} = (\delta/(n\kappa))^2\,\mathcal E_{te}`.

MSE here is the plain mean squared error :math:`\mathbb E(\hat f - y)^2` (no factor 1/2), summed
over output columns for vector targets (each column is an independent scalar problem with the
same kernel, so the predictions add).

The equations are asymptotic (exact as :math:`n` and the number of relevant modes grow); at
small :math:`n` they are typically within a few percent. For :math:`\delta = 0` a solution
exists only when :math:`n` is smaller than the number of nonzero eigenvalues.

Empirical eigensystem
---------------------
For a finite pool of :math:`N` points taken as the distribution itself (uniform measure on the
pool), the Mercer decomposition is exact: :math:`\lambda_i = \mathrm{eig}_i(K_{pool})/N` and
:math:`\phi_i(x_j) = \sqrt N\,(\text{eigenvector}_i)_j` (:func:`pool_eigensystem`), and
:math:`v_i = \frac1N\sum_j \phi_i(x_j) f(x_j)` (:func:`target_coefficients`). Sampling
training sets from that pool makes theory and experiment share the same distribution.

Example:
    >>> import numpy as np
    >>> lam = 1.0 / np.arange(1, 201) ** 2           # power-law spectrum
    >>> v = 1.0 / np.arange(1, 201)                  # target coefficients
    >>> pred = eigenlearning(lam, v, n=20, ridge=1e-3, noise=0.1)
    >>> round(pred.kappa, 5), round(pred.test_mse, 5)
    (0.00548, 0.12773)
    >>> bool(pred.learnabilities.sum() <= 20)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "EigenlearningPrediction",
    "solve_kappa",
    "eigenlearning",
    "learning_curve",
    "pool_eigensystem",
    "target_coefficients",
    "krr_fit_predict",
    "empirical_learning_curve",
    "laplace_kernel",
    "rbf_kernel",
    "relu_ntk",
]


@dataclass
class EigenlearningPrediction:
    """The eigenlearning prediction at one sample size (fields as in the module docstring)."""

    n: int
    ridge: float
    kappa: float
    learnabilities: np.ndarray
    overfitting: float  # E_0
    test_mse: float  # against noisy test labels (includes noise**2)
    test_mse_clean: float  # against the clean target
    train_mse: float
    target_learnability: float


def solve_kappa(eigenvalues: np.ndarray, n: int, ridge: float = 0.0) -> float:
    r"""The effective regularization :math:`\kappa>0` with
    :math:`\sum_i \lambda_i/(\lambda_i+\kappa) + \delta/\kappa = n`.

    The left side decreases strictly in :math:`\kappa`, from :math:`+\infty` (ridge > 0) or the
    number of positive eigenvalues (ridge = 0) down to 0, so the root is unique; it is found with
    Brent's method on :math:`\log\kappa`.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if np.any(lam < 0):
        raise ValueError("eigenvalues must be >= 0 (clip tiny negative ones from eigh first)")
    lam = lam[lam > 0]
    if ridge == 0 and n >= len(lam):
        raise ValueError(f"ridgeless KRR with n={n} >= {len(lam)} positive eigenvalues interpolates "
                         "exactly (kappa = 0); use ridge > 0 or more eigenvalues")

    def excess(log_kappa: float) -> float:
        kappa = np.exp(log_kappa)
        return float(np.sum(lam / (lam + kappa)) + ridge / kappa - n)

    lo, hi = np.log(lam.max()) + 1.0, np.log(lam.max()) + 1.0
    while excess(lo) < 0:
        lo -= 2.0
        if lo < -745:
            raise ValueError("could not bracket kappa (spectrum too small for this n)")
    while excess(hi) > 0:
        hi += 2.0
    return float(np.exp(brentq(excess, lo, hi, xtol=1e-14, rtol=1e-13)))


def eigenlearning(eigenvalues: np.ndarray, coefficients: np.ndarray, n: int, ridge: float = 0.0,
                  noise: float = 0.0) -> EigenlearningPrediction:
    r"""Eigenlearning prediction for KRR with ``n`` samples (equations in the module docstring).

    ``coefficients`` is ``(M,)`` or ``(M, k)`` for ``k`` output columns (errors are summed
    over columns); ``noise`` is the label-noise standard deviation :math:`\varepsilon` (per
    column).
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    v = np.asarray(coefficients, dtype=np.float64)
    if v.shape[0] != lam.shape[0]:
        raise ValueError(f"{lam.shape[0]} eigenvalues but {v.shape[0]} target coefficients")
    v2 = (v ** 2).reshape(len(lam), -1).sum(axis=1)
    n_cols = 1 if v.ndim == 1 else v.shape[1]
    kappa = solve_kappa(lam, n, ridge)
    learn = lam / (lam + kappa)
    e0 = n / (n - np.sum(learn ** 2))
    clean_bias = float(np.sum((1 - learn) ** 2 * v2))
    test = e0 * (clean_bias + n_cols * noise ** 2)
    return EigenlearningPrediction(
        n=int(n), ridge=float(ridge), kappa=kappa, learnabilities=learn, overfitting=float(e0),
        test_mse=float(test), test_mse_clean=float(test - n_cols * noise ** 2),
        train_mse=float((ridge / (n * kappa)) ** 2 * test),
        target_learnability=float(np.sum(learn * v2) / max(np.sum(v2), 1e-300)),
    )


def learning_curve(eigenvalues: np.ndarray, coefficients: np.ndarray, ns, ridge: float = 0.0,
                   noise: float = 0.0) -> list[EigenlearningPrediction]:
    """:func:`eigenlearning` at each sample size in ``ns``."""
    return [eigenlearning(eigenvalues, coefficients, int(n), ridge, noise) for n in ns]


def pool_eigensystem(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact Mercer decomposition for the uniform measure on a pool of ``N`` points.

    Returns eigenvalues :math:`\lambda_i = \mathrm{eig}_i(K)/N` in decreasing order (tiny
    negative round-off clipped to 0) and eigenfunctions ``phi`` of shape ``(N, N)`` with
    ``phi[:, i]`` the values of :math:`\phi_i` on the pool, normalized to
    :math:`\frac1N\sum_j \phi_i(x_j)^2 = 1`.
    """
    gram = np.asarray(gram, dtype=np.float64)
    n_pool = gram.shape[0]
    if gram.shape != (n_pool, n_pool):
        raise ValueError(f"gram must be square, got {gram.shape}")
    evals, evecs = np.linalg.eigh((gram + gram.T) / 2.0)
    order = np.argsort(evals)[::-1]
    return np.clip(evals[order], 0, None) / n_pool, evecs[:, order] * np.sqrt(n_pool)


def target_coefficients(phi: np.ndarray, target: np.ndarray) -> np.ndarray:
    r""":math:`v_i = \frac1N \sum_j \phi_i(x_j) f(x_j)` (``target`` of shape ``(N,)`` or ``(N, k)``)."""
    return phi.T @ np.asarray(target, dtype=np.float64) / phi.shape[0]


def krr_fit_predict(k_train: np.ndarray, k_eval_train: np.ndarray, y_train: np.ndarray, ridge: float) -> np.ndarray:
    r"""KRR predictions :math:`k(x, X)(K_{XX} + \delta I)^{-1} y` (Cholesky, or lstsq if singular)."""
    n = k_train.shape[0]
    a = k_train + ridge * np.eye(n)
    try:
        from scipy.linalg import cho_factor, cho_solve

        alpha = cho_solve(cho_factor(a, lower=True), y_train)
    except np.linalg.LinAlgError:
        alpha = np.linalg.lstsq(a, y_train, rcond=None)[0]
    return k_eval_train @ alpha


def empirical_learning_curve(gram: np.ndarray, target: np.ndarray, ns, ridge: float = 0.0, noise: float = 0.0,
                             trials: int = 20, seed: int = 0, replace: bool = True) -> dict[str, np.ndarray]:
    r"""Brute-force KRR test MSE averaged over random training sets drawn from a pool.

    The pool (``gram`` is its ``N x N`` kernel matrix, ``target`` its clean labels) *is* the
    distribution: each trial draws ``n`` distinct pool points uniformly, adds
    :math:`\mathcal N(0,\varepsilon^2)` noise to their labels, fits KRR and measures the mean
    squared error against the clean target over the whole pool, plus :math:`\varepsilon^2` per
    column (the noisy-test-label convention of :func:`eigenlearning`). Drawing without
    replacement keeps ridgeless Gram matrices nonsingular; for ``n << N`` it matches iid sampling.

    Returns ``{"n", "test_mse" (mean over trials), "test_mse_sem" (standard error),
    "train_mse"}``.
    """
    gram = np.asarray(gram, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    y2 = y.reshape(len(y), -1)
    n_pool = gram.shape[0]
    rng = np.random.default_rng(seed)
    ns = [int(n) for n in ns]
    if max(ns) > n_pool:
        raise ValueError(f"n up to {max(ns)} but the pool has only {n_pool} points")
    means, sems, trains = [], [], []
    for n in ns:
        errs, tr = [], []
        for _ in range(trials):
            idx = rng.choice(n_pool, size=n, replace=replace)
            y_noisy = y2[idx] + noise * rng.standard_normal((n, y2.shape[1]))
            pred = krr_fit_predict(gram[np.ix_(idx, idx)], gram[:, idx], y_noisy, ridge)
            errs.append(np.mean(np.sum((pred - y2) ** 2, axis=1)) + y2.shape[1] * noise ** 2)
            tr.append(np.mean(np.sum((pred[idx] - y_noisy) ** 2, axis=1)))
        means.append(np.mean(errs))
        sems.append(np.std(errs, ddof=1) / np.sqrt(trials) if trials > 1 else np.nan)
        trains.append(np.mean(tr))
    return {"n": np.array(ns), "test_mse": np.array(means), "test_mse_sem": np.array(sems),
            "train_mse": np.array(trains)}


def _sq_dists(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    d2 = np.sum(x ** 2, 1)[:, None] + np.sum(z ** 2, 1)[None, :] - 2.0 * x @ z.T
    return np.clip(d2, 0, None)


def laplace_kernel(x: np.ndarray, z: np.ndarray, bandwidth: float) -> np.ndarray:
    r"""Laplace kernel :math:`K(x,z) = \exp(-\lVert x-z\rVert_2/\ell)` (``bandwidth`` :math:`\ell`)."""
    return np.exp(-np.sqrt(_sq_dists(np.asarray(x, np.float64), np.asarray(z, np.float64))) / bandwidth)


def rbf_kernel(x: np.ndarray, z: np.ndarray, bandwidth: float) -> np.ndarray:
    r"""Gaussian kernel :math:`K(x,z) = \exp(-\lVert x-z\rVert^2/(2\ell^2))`."""
    return np.exp(-_sq_dists(np.asarray(x, np.float64), np.asarray(z, np.float64)) / (2.0 * bandwidth ** 2))


def relu_ntk(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    r"""Infinite-width NTK of a two-layer ReLU network (no biases).

    For :math:`f(x) = m^{-1/2}\sum_{i=1}^m a_i\,\mathrm{ReLU}(w_i^\top x)` with
    :math:`a_i \sim \mathcal N(0,1)`, :math:`w_i \sim \mathcal N(0, I_d)` and both layers trained,

    .. math::  \Theta(x,x') = \frac{\lVert x\rVert\lVert x'\rVert}{2\pi}\,(\sin\theta +
               (\pi-\theta)\cos\theta) + x^\top x'\,\frac{\pi-\theta}{2\pi},
               \qquad \theta = \arccos\frac{x^\top x'}{\lVert x\rVert\lVert x'\rVert}.

    The first term is the readout-layer (NNGP, arc-cosine of degree 1) kernel, the second the
    first-layer term (Cho & Saul 2009; Jacot, Gabriel & Hongler 2018). It equals
    :math:`\lim_{m\to\infty} \nabla_\theta f(x)^\top\nabla_\theta f(x')` (tested against the
    empirical NTK of a wide network).
    """
    x = np.asarray(x, np.float64)
    z = np.asarray(z, np.float64)
    nx = np.linalg.norm(x, axis=1)[:, None]
    nz = np.linalg.norm(z, axis=1)[None, :]
    dot = x @ z.T
    cos = np.clip(dot / np.maximum(nx * nz, 1e-300), -1.0, 1.0)
    theta = np.arccos(cos)
    return nx * nz / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos) + dot * (np.pi - theta) / (2 * np.pi)
