"""lmech.theory.scaling: the Chinchilla-law fit recovers known laws; bootstrap intervals cover them."""

import doctest

import numpy as np
import pytest
from scipy.optimize import approx_fprime
from threadpoolctl import threadpool_limits

from lmech.theory import scaling as sc

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def _grid(noise=0.0, seed=0, law=HOFFMANN, shape=(6, 6)):
    n, d = np.meshgrid(np.logspace(6, 9, shape[0]), np.logspace(8, 11, shape[1]))
    loss = sc.chinchilla_loss(n, d, **law) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.shape))
    return n.ravel(), d.ravel(), loss.ravel()


def test_doctests():
    assert doctest.testmod(sc, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_huber_pieces():
    r = np.array([-0.5, -1e-4, 0.0, 2e-4, 3.0])
    np.testing.assert_allclose(sc.huber(r, 1e-3), [1e-3 * (0.5 - 5e-4), 0.5e-8, 0.0, 2e-8, 1e-3 * (3.0 - 5e-4)])


def test_objective_gradient_matches_finite_differences():
    n, d, loss = _grid(noise=0.05, seed=1)
    args = (np.log(n), np.log(d), np.log(loss), 0.3)  # large delta: smooth enough for finite differences
    for theta in (np.array([6.0, 6.0, 0.5, 0.34, 0.28]), np.array([4.0, 9.0, 0.2, 0.2, 0.5])):
        analytic = sc.objective(theta, *args)[1]
        numeric = approx_fprime(theta, lambda th: sc.objective(th, *args)[0], 1e-7)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU], ids=["hoffmann", "besiroglu"])
def test_noiseless_recovery(law):
    fit = sc.fit_scaling_law(*_grid(law=law))
    for key, value in law.items():
        assert getattr(fit, key) == pytest.approx(value, rel=1e-4), key


def test_best_k_starts_reach_the_all_starts_optimum():
    small_grid = {"a": np.array([0.0, 10.0]), "b": np.array([0.0, 10.0]), "e": np.array([-1.0, 1.0]),
                  "alpha": np.array([0.0, 1.0]), "beta": np.array([0.0, 1.0])}
    data = _grid(noise=0.02, seed=3)
    everywhere = sc.fit_scaling_law(*data, n_starts=32, grid=small_grid)
    best_four = sc.fit_scaling_law(*data, n_starts=4, grid=small_grid)
    assert best_four.objective == pytest.approx(everywhere.objective, rel=1e-6)
    assert best_four.alpha == pytest.approx(everywhere.alpha, abs=1e-5)


def test_bootstrap_intervals_contain_the_true_law():
    """2% multiplicative noise on a 6 x 6 grid: every true parameter inside its 95% interval."""
    fit = sc.bootstrap_scaling_law(*_grid(noise=0.02, seed=0), n_boot=150, seed=0)
    assert fit.ci_level == 0.95 and fit.samples.shape == (150, 5)
    for key, value in HOFFMANN.items():
        assert fit.contains(key, value), (key, value, fit.ci[key])
    assert fit.ci["alpha"][1] - fit.ci["alpha"][0] < 0.2  # informative, not vacuous


@pytest.mark.slow
def test_bootstrap_coverage_over_many_synthetic_data_sets():
    """Frequentist check of the 95% intervals: coverage over 30 independent noisy grids."""
    hits = {k: 0 for k in HOFFMANN}
    for seed in range(30):
        fit = sc.bootstrap_scaling_law(*_grid(noise=0.02, seed=100 + seed), n_boot=200, seed=seed)
        for key, value in HOFFMANN.items():
            hits[key] += fit.contains(key, value)
    for key, count in hits.items():
        assert count >= 24, (key, count)  # >= 80% of 30


def test_compute_optimal_minimizes_loss_on_the_isoflop_curve():
    law = BESIROGLU
    c = 1e21
    n_opt, d_opt = sc.compute_optimal(c, law["A"], law["B"], law["alpha"], law["beta"])
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-10)
    ns = n_opt * np.logspace(-1, 1, 401)
    losses = sc.chinchilla_loss(ns, c / (6 * ns), **law)
    assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.02)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 5 points"):
        sc.fit_scaling_law([1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive and finite"):
        sc.fit_scaling_law(np.ones(6), np.ones(6), np.r_[np.ones(5), -1.0])
    with pytest.raises(ValueError, match="same length"):
        sc.fit_scaling_law(np.ones(6), np.ones(5), np.ones(6))
