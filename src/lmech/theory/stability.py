r"""Linear stability thresholds of gradient methods: where the edge of stability sits.

On a quadratic :math:`L(\theta) = \tfrac12 \lambda \theta^2` (one Hessian eigendirection with
curvature :math:`\lambda > 0`) every method below is a linear recurrence on its state, and the
iterate converges iff :math:`\lambda` stays below a threshold :math:`\lambda^*(\eta)`. On a
neural network the same number is the *edge of stability*: under full-batch training the
sharpness :math:`\lambda_1(H)` rises (progressive sharpening) until it reaches
:math:`\lambda^*` and then hovers there while the loss keeps decreasing non-monotonically
(Cohen, Kaur, Li, Kolter & Talwalkar, *Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability*, ICLR 2021; Cohen et al., *Adaptive Gradient Methods at the Edge of
Stability*, 2022).

Update rules (exactly as ``torch.optim`` implements them; :math:`g = \nabla L(\theta)`) and
thresholds:

* ``gd``: :math:`\theta \leftarrow \theta - \eta g`; :math:`\lambda^* = 2/\eta`.
* ``heavy_ball`` (SGD ``momentum=beta``; the same iterates as Polyak's
  :math:`\theta_{t+1} = \theta_t - \eta g_t + \beta(\theta_t - \theta_{t-1})`):
  :math:`v \leftarrow \beta v + g,\ \theta \leftarrow \theta - \eta v`;
  :math:`\lambda^* = (2 + 2\beta)/\eta`.
* ``nesterov`` (SGD ``nesterov=True``): :math:`v \leftarrow \beta v + g,\
  \theta \leftarrow \theta - \eta (g + \beta v)`; :math:`\lambda^* = (2 + 2\beta)/((1 + 2\beta)\eta)`.
* ``adam``: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g,\ \theta \leftarrow \theta - \eta P^{-1} m`
  with :math:`P = (1-\beta_1^t)\operatorname{diag}(\sqrt{\hat v}+\epsilon)` held fixed; the
  threshold is on the preconditioned sharpness :math:`\lambda_1(P^{-1}H)`:
  :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`, i.e. 38/η at :math:`\beta_1 = 0.9`.

Derivations (characteristic polynomial :math:`z^2 - T z + D` of the two-step recurrence;
Jury's conditions :math:`|D| < 1`, :math:`1 - T + D > 0`, :math:`1 + T + D > 0`):

* heavy ball: :math:`\theta_{t+1} = (1 + \beta - \eta\lambda)\theta_t - \beta\theta_{t-1}`, so
  :math:`T = 1+\beta-\eta\lambda`, :math:`D = \beta`; the binding condition is
  :math:`1 + T + D = 2 + 2\beta - \eta\lambda > 0`. At :math:`\beta = 0` this is GD's
  :math:`\eta\lambda < 2`.
* Nesterov: on the state :math:`(v, \theta)`, :math:`T = 1 + \beta - \eta\lambda(1+\beta)`,
  :math:`D = \beta(1 - \eta\lambda)`; :math:`1 + T + D = 2 + 2\beta - \eta\lambda(1+2\beta) > 0`
  binds (at the threshold :math:`|D| = \beta/(1+2\beta) < 1`).
* Adam with a frozen preconditioner, in the eigenbasis of :math:`P^{-1/2}HP^{-1/2}` (eigenvalue
  :math:`\lambda`): :math:`v = m/(1-\beta_1)` turns the EMA into heavy ball with step
  :math:`\eta(1-\beta_1)`, so :math:`\eta(1-\beta_1)\lambda < 2 + 2\beta_1`. The preconditioner
  convention (including the :math:`1-\beta_1^t` bias correction of :math:`m`) is the one of
  :func:`lmech.probes.hessian.adam_preconditioner`, which folds :math:`\eta` into :math:`P`
  and so compares :math:`\lambda_1` with the dimensionless :math:`(2+2\beta_1)/(1-\beta_1)`;
  divide its eigenvalues by :math:`\eta` to compare with :func:`adam_threshold`.

The momentum thresholds are the ones in the appendix of Cohen et al. (2021), flagged "check" in
shared/research/learning-mechanics.md; they are re-derived above and tested here against
``torch.optim.SGD`` and ``torch.optim.Adam`` on quadratics (tests/test_stability.py).

Example:
    >>> gd_threshold(0.01), heavy_ball_threshold(0.01, 0.9), round(adam_threshold(1e-3, 0.9))
    (200.0, 380.0, 38000)
    >>> round(nesterov_threshold(0.01, 0.9), 4)
    135.7143
    >>> bool(is_stable("gd", lr=0.1, curvature=19.9)), bool(is_stable("gd", lr=0.1, curvature=20.1))
    (True, False)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "METHODS",
    "Method",
    "gd_threshold",
    "heavy_ball_threshold",
    "nesterov_threshold",
    "adam_threshold",
    "threshold",
    "iteration_matrix",
    "spectral_radius",
    "is_stable",
    "edge_ratio",
]

Method = Literal["gd", "heavy_ball", "nesterov", "adam"]
METHODS: tuple[str, ...] = ("gd", "heavy_ball", "nesterov", "adam")


def _check(lr: float, beta: float = 0.0) -> None:
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum / beta1 must be in [0, 1), got {beta}")


def gd_threshold(lr: float) -> float:
    r"""Gradient descent: :math:`\lambda^* = 2/\eta` (``theta -= lr * grad`` diverges on a
    quadratic iff :math:`\eta\lambda > 2`)."""
    _check(lr)
    return 2.0 / lr


def heavy_ball_threshold(lr: float, momentum: float) -> float:
    r"""Heavy-ball (Polyak / PyTorch SGD) momentum: :math:`\lambda^* = (2 + 2\beta)/\eta`."""
    _check(lr, momentum)
    return (2.0 + 2.0 * momentum) / lr


def nesterov_threshold(lr: float, momentum: float) -> float:
    r"""Nesterov momentum (PyTorch ``nesterov=True``): :math:`\lambda^* = (2+2\beta)/((1+2\beta)\eta)`."""
    _check(lr, momentum)
    return (2.0 + 2.0 * momentum) / ((1.0 + 2.0 * momentum) * lr)


def adam_threshold(lr: float, beta1: float = 0.9) -> float:
    r"""Adam's preconditioned sharpness :math:`\lambda_1(P^{-1}H)` threshold,
    :math:`(2+2\beta_1)/((1-\beta_1)\eta)` (38/η at :math:`\beta_1 = 0.9`), for a frozen
    :math:`P = (1-\beta_1^t)\operatorname{diag}(\sqrt{\hat v}+\epsilon)` (module docstring)."""
    _check(lr, beta1)
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def threshold(method: Method, lr: float, momentum: float = 0.0) -> float:
    """The threshold of ``method`` (``gd``, ``heavy_ball``, ``nesterov`` or ``adam``);
    ``momentum`` is :math:`\\beta` (:math:`\\beta_1` for Adam)."""
    if method == "gd":
        if momentum != 0.0:
            raise ValueError("gd has no momentum; use method='heavy_ball' or 'nesterov'")
        return gd_threshold(lr)
    if method == "heavy_ball":
        return heavy_ball_threshold(lr, momentum)
    if method == "nesterov":
        return nesterov_threshold(lr, momentum)
    if method == "adam":
        return adam_threshold(lr, momentum)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def iteration_matrix(method: Method, lr: float, curvature: float, momentum: float = 0.0) -> np.ndarray:
    r"""The linear map of one step on :math:`L = \tfrac12\lambda\theta^2`, acting on the state
    ``(v, theta)`` (``v``: momentum buffer; for ``gd`` it is unused and the map is
    ``[[0, 0], [0, 1 - lr*curvature]]``). ``curvature`` for ``adam`` is an eigenvalue of
    :math:`P^{-1}H` (preconditioner frozen). The iteration is stable iff the spectral radius is
    below 1 (:func:`spectral_radius`).

    Example:
        >>> iteration_matrix("heavy_ball", lr=0.1, curvature=2.0, momentum=0.5)
        array([[ 0.5 ,  2.  ],
               [-0.05,  0.8 ]])
    """
    _check(lr, momentum)
    lam, b = float(curvature), float(momentum)
    if method == "gd":
        return np.array([[0.0, 0.0], [0.0, 1.0 - lr * lam]])
    if method == "heavy_ball":      # v' = b v + lam th ; th' = th - lr v'
        return np.array([[b, lam], [-lr * b, 1.0 - lr * lam]])
    if method == "nesterov":        # v' = b v + lam th ; th' = th - lr (lam th + b v')
        return np.array([[b, lam], [-lr * b * b, 1.0 - lr * lam * (1.0 + b)]])
    if method == "adam":            # m' = b m + (1 - b) lam th ; th' = th - lr m'
        return np.array([[b, (1.0 - b) * lam], [-lr * b, 1.0 - lr * (1.0 - b) * lam]])
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def spectral_radius(method: Method, lr: float, curvature: float, momentum: float = 0.0) -> float:
    """Largest eigenvalue modulus of :func:`iteration_matrix` (the asymptotic growth factor per step)."""
    return float(np.abs(np.linalg.eigvals(iteration_matrix(method, lr, curvature, momentum))).max())


def is_stable(method: Method, lr: float, curvature: float, momentum: float = 0.0) -> bool:
    """Whether the iterate converges on the quadratic (spectral radius < 1)."""
    return spectral_radius(method, lr, curvature, momentum) < 1.0


def edge_ratio(sharpness, threshold: float, last_fraction: float = 0.5) -> float:
    r"""Mean of :math:`\lambda_1 / \lambda^*` over the last ``last_fraction`` of a sharpness series
    (the measurement of "hovers at the edge": 1 means exactly at the threshold).

    Example:
        >>> edge_ratio([1.0, 5.0, 19.0, 21.0], threshold=20.0)
        1.0
    """
    s = np.asarray(sharpness, dtype=float).ravel()
    if s.size == 0:
        raise ValueError("sharpness series is empty")
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold}")
    tail = s[s.size - max(1, round(last_fraction * s.size)):]
    return float(np.mean(tail) / threshold)
