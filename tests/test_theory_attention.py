"""lmech.theory.attention: the particle flow against its energy, its symmetries and its 1-D reduction."""

import doctest

import numpy as np
import pytest
import torch

from lmech.theory import attention as at


def test_doctests():
    assert doctest.testmod(at, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def _loop_field(x, beta, model, causal, q, k, v):
    """Slow reference: one token at a time, straight from the formula."""
    n = len(x)
    out = np.zeros_like(x)
    for i in range(n):
        js = range(i + 1) if causal else range(n)
        weights = np.array([np.exp(beta * (q @ x[i]) @ (k @ x[j])) for j in js])
        weights = weights / weights.sum() if model == "SA" else weights / n
        y = sum(w * (v @ x[j]) for w, j in zip(weights, js))
        out[i] = y - (x[i] @ y) * x[i]
    return out


@pytest.mark.parametrize("model", ["SA", "USA"])
@pytest.mark.parametrize("causal", [False, True])
def test_field_matches_loop_reference(model, causal):
    rng = np.random.default_rng(0)
    x = at.random_sphere(7, 4, seed=1)
    q, k, v = (rng.standard_normal((4, 4)) for _ in range(3))
    fast = at.attention_field(x, 1.5, model, causal, q, k, v)
    np.testing.assert_allclose(fast, _loop_field(x, 1.5, model, causal, q, k, v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.sum(fast * x, axis=1), 0.0, atol=1e-12)  # tangent to the sphere


def test_usa_is_n_times_the_riemannian_gradient_of_the_energy():
    x = at.random_sphere(9, 3, seed=2)
    beta = 2.0
    xt = torch.tensor(x, requires_grad=True)
    energy = torch.exp(beta * xt @ xt.T).sum() / (2 * beta * 9 ** 2)
    (grad,) = torch.autograd.grad(energy, xt)
    grad = grad.numpy()
    riemannian = grad - np.sum(grad * x, axis=1, keepdims=True) * x
    np.testing.assert_allclose(at.attention_field(x, beta, "USA"), 9 * riemannian, rtol=1e-12)
    assert at.interaction_energy(x, beta) == pytest.approx(energy.item())


@pytest.mark.parametrize("model,dt", [("SA", 0.05), ("USA", 0.01)])
def test_energy_never_decreases_with_full_attention(model, dt):
    sim = at.simulate(at.random_sphere(24, 3, seed=3), beta=3.0, t_max=30.0, dt=dt, model=model, record_every=5)
    assert np.all(np.diff(sim.energy) >= -1e-12 * sim.energy[:-1])
    assert sim.clusters[-1] < sim.clusters[0]


def test_causal_first_token_is_fixed_and_everyone_joins_it():
    x0 = at.random_sphere(16, 3, seed=4)
    sim = at.simulate(x0, beta=2.0, t_max=200.0, dt=0.1, causal=True, record_every=200)
    assert np.abs(sim.x[:, 0] - x0[0]).max() < 1e-12
    assert np.max(1.0 - sim.x[-1] @ x0[0]) < 1e-6
    assert sim.clusters[-1] == 1


@pytest.mark.parametrize("model", ["SA", "USA"])
def test_equiangular_start_follows_the_one_dimensional_reduction(model):
    n, beta = 6, 3.0
    x0 = at.equiangular_configuration(n, 8, rho=-0.1, seed=5)
    gram0 = x0 @ x0.T
    np.testing.assert_allclose(gram0[~np.eye(n, dtype=bool)], -0.1, atol=1e-12)
    dt = 0.01 if model == "SA" else 0.002
    sim = at.simulate(x0, beta=beta, t_max=4.0, dt=dt, model=model, record_every=50)
    off = ~np.eye(n, dtype=bool)
    rho = np.array([(xk @ xk.T)[off] for xk in sim.x])
    assert rho.std(axis=1).max() < 1e-10  # stays equiangular
    np.testing.assert_allclose(rho.mean(axis=1), at.equiangular_rho(-0.1, n, beta, sim.t, model), atol=1e-8)


def test_count_clusters():
    e = np.eye(3)
    x = np.array([e[0], e[0], (e[0] + 1e-3 * e[1]) / np.linalg.norm(e[0] + 1e-3 * e[1]), e[1], -e[1]])
    assert at.count_clusters(x) == 3


def test_large_beta_softmax_does_not_overflow():
    x = at.random_sphere(5, 3, seed=6)
    field = at.attention_field(x, 1e4, "SA")
    assert np.all(np.isfinite(field))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="model must be"):
        at.attention_field(at.random_sphere(3, 3), 1.0, model="XX")
    with pytest.raises(ValueError, match="needs d >= n"):
        at.equiangular_configuration(5, 3, 0.0)
    with pytest.raises(FloatingPointError, match="lower dt"):
        at.simulate(at.random_sphere(8, 3), beta=8.0, t_max=5.0, dt=1.0, model="USA")
