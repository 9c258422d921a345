"""lmech.theory.stability: thresholds against torch.optim on quadratics, and the closed forms."""

import doctest

import numpy as np
import pytest
import torch

from lmech.theory import stability
from lmech.theory.stability import (
    adam_threshold,
    edge_ratio,
    gd_threshold,
    heavy_ball_threshold,
    is_stable,
    iteration_matrix,
    nesterov_threshold,
    spectral_radius,
    threshold,
)


def _torch_threshold(make_opt, guess: float, theta0: float = 1.0, steps: int = 3000, idle: int = 0) -> float:
    """The smallest curvature at which a torch optimizer diverges on a quadratic, measured.

    Every coordinate of one parameter vector gets its own curvature on a fine grid around
    ``guess`` (L = sum_k lambda_k theta_k^2 / 2; SGD and Adam act coordinate-wise, so this is
    many independent 1-D quadratics in one run); a coordinate has diverged when it grew by 1e3
    at any step (Adam's growing second moment later damps a diverging coordinate again).
    ``idle`` steps at theta = 0 (zero gradient) come first: they let Adam's bias corrections
    1/(1 - beta^t) reach 1 before the quadratic starts.
    """
    lam = torch.linspace(0.8 * guess, 1.2 * guess, 4001, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.zeros_like(lam))
    opt = make_opt([theta])
    for _ in range(idle):
        theta.grad = torch.zeros_like(lam)
        opt.step()
    with torch.no_grad():
        theta.fill_(theta0)
    diverged = torch.zeros_like(lam, dtype=torch.bool)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lam * theta.pow(2)).sum()).backward()
        opt.step()
        diverged |= ~(theta.detach().abs() < 1e3 * theta0)  # NaN/inf counts as diverged
    assert not diverged[0] and diverged[-1], "the grid does not bracket the threshold"
    return float(lam[diverged.nonzero()[0, 0]])


def test_doctests():
    assert doctest.testmod(stability, raise_on_error=True).attempted > 0


def test_gd_diverges_iff_lr_times_curvature_exceeds_two():
    lr = 0.05
    measured = _torch_threshold(lambda p: torch.optim.SGD(p, lr=lr), guess=40.0)
    assert measured == pytest.approx(gd_threshold(lr), rel=2e-3)
    assert gd_threshold(lr) == pytest.approx(2 / lr)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_heavy_ball_threshold_matches_torch_sgd_momentum(beta):
    lr = 0.1
    measured = _torch_threshold(lambda p: torch.optim.SGD(p, lr=lr, momentum=beta), guess=(2 + 2 * beta) / lr)
    assert measured == pytest.approx(heavy_ball_threshold(lr, beta), rel=2e-3)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_nesterov_threshold_matches_torch_sgd_nesterov(beta):
    lr = 0.1
    measured = _torch_threshold(lambda p: torch.optim.SGD(p, lr=lr, momentum=beta, nesterov=True),
                                guess=(2 + 2 * beta) / ((1 + 2 * beta) * lr))
    assert measured == pytest.approx(nesterov_threshold(lr, beta), rel=2e-3)


def test_adam_threshold_matches_torch_adam_with_frozen_preconditioner():
    """With eps >> sqrt(v_hat), Adam's preconditioner is the constant eps (a frozen P), so the
    eigenvalues of P^-1 H are curvature / eps. The start (theta = 1e-12) keeps |g| <= 1e-9 *
    curvature below 50 << eps = 1e6 until a coordinate has grown by 1e3; 300 idle steps first
    remove the bias-correction transient (the threshold is the late-training one)."""
    lr, eps, beta1 = 1e-3, 1e6, 0.9
    adam = lambda p: torch.optim.Adam(p, lr=lr, betas=(beta1, 0.999), eps=eps)
    measured = _torch_threshold(adam, guess=38.0 / lr * eps, theta0=1e-12, idle=300) / eps  # curvature of P^-1 H
    assert measured == pytest.approx(adam_threshold(lr, beta1), rel=5e-3)
    assert adam_threshold(1.0, 0.9) == pytest.approx(38.0)


@pytest.mark.parametrize("method,beta", [("gd", 0.0), ("heavy_ball", 0.7), ("nesterov", 0.7), ("adam", 0.9)])
def test_spectral_radius_crosses_one_at_the_threshold(method, beta):
    lr = 0.02
    lam = threshold(method, lr, beta)
    assert spectral_radius(method, lr, lam, beta) == pytest.approx(1.0, abs=1e-9)
    assert is_stable(method, lr, 0.999 * lam, beta)
    assert not is_stable(method, lr, 1.001 * lam, beta)


@pytest.mark.parametrize("method,beta", [("heavy_ball", 0.6), ("nesterov", 0.6), ("adam", 0.6)])
def test_iteration_matrix_reproduces_the_update_rule(method, beta):
    """One step of the matrix == one step of the update written out directly."""
    lr, lam, v, th = 0.1, 3.0, 0.4, -1.3
    out = iteration_matrix(method, lr, lam, beta) @ np.array([v, th])
    g = lam * th
    if method == "heavy_ball":
        v2 = beta * v + g
        th2 = th - lr * v2
    elif method == "nesterov":
        v2 = beta * v + g
        th2 = th - lr * (g + beta * v2)
    else:
        v2 = beta * v + (1 - beta) * g
        th2 = th - lr * v2
    assert out == pytest.approx([v2, th2])


def test_momentum_zero_reduces_to_gd():
    assert heavy_ball_threshold(0.3, 0.0) == gd_threshold(0.3) == nesterov_threshold(0.3, 0.0)


def test_edge_ratio_uses_the_last_fraction():
    series = [0.0] * 10 + [9.0, 11.0] * 5
    assert edge_ratio(series, 10.0) == pytest.approx(1.0)
    assert edge_ratio(series, 10.0, last_fraction=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("call", [
    lambda: gd_threshold(0.0),
    lambda: heavy_ball_threshold(0.1, 1.0),
    lambda: threshold("gd", 0.1, momentum=0.9),
    lambda: threshold("lbfgs", 0.1),
    lambda: edge_ratio([], 1.0),
    lambda: edge_ratio([1.0], -1.0),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
