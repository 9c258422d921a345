"""lmech.theory.deep_linear: closed forms against independent numerical integration."""

import doctest

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from lmech.theory import deep_linear as dl


def _teacher(d=6, s=(3.0, 1.5, 0.5), seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    r = len(s)
    return u[:, :r], v[:, :r], np.array(s), u[:, :r] @ np.diag(s) @ v[:, :r].T


def test_doctests():
    assert doctest.testmod(dl, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 6])
def test_mode_trajectory_matches_solve_ivp_of_the_mode_ode(depth):
    s, u0 = 1.7, 1e-3
    t = np.linspace(0, 25.0, 60)
    sol = solve_ivp(lambda _t, u: dl.mode_rhs(u, s, depth), (0, t[-1]), [u0], t_eval=t, rtol=1e-12, atol=1e-15,
                    method="DOP853")
    np.testing.assert_allclose(dl.mode_trajectory(t, s, u0, depth), sol.y[0], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mode_time_matches_quadrature(depth):
    s, u0 = 2.0, 1e-4
    for u in (1e-3, 0.5, 1.0, 1.99):
        expected = quad(lambda x: 1.0 / dl.mode_rhs(x, s, depth), u0, u, limit=200, epsrel=1e-12)[0]
        assert dl.mode_time(u, s, u0, depth) == pytest.approx(expected, rel=1e-8)


def test_half_time_formula_depth_two():
    s, u0 = 4.0, 1e-5
    assert dl.half_time(s, u0) == pytest.approx(np.log((s - u0) / u0) / (2 * s), rel=1e-12)
    # trajectory and time are inverse functions
    t_half = dl.half_time(s, u0, depth=3)
    assert dl.mode_trajectory(t_half, s, u0, depth=3) == pytest.approx(s / 2, rel=1e-9)


@pytest.mark.parametrize("depth", [2, 3])
def test_aligned_matrix_flow_follows_closed_form(depth):
    """The full matrix gradient flow (solve_ivp) from an aligned balanced start decouples into modes."""
    u_mat, v_mat, s, teacher = _teacher()
    d = teacher.shape[0]
    u0 = np.array([1e-3, 2e-3, 5e-3])
    rng = np.random.default_rng(1)
    rots = [np.linalg.qr(rng.standard_normal((8, 8)))[0] for _ in range(depth - 1)]
    weights = dl.aligned_init(u_mat, v_mat, u0, depth=depth, width=8, rotations=rots)
    t = np.linspace(0, 12.0, 25)
    flow = dl.gradient_flow(weights, np.eye(d), teacher, t)
    for k, tk in enumerate(t):
        modes = np.diag(u_mat.T @ flow.end_to_end(k) @ v_mat)
        expected = [dl.mode_trajectory(tk, s[m], u0[m], depth) for m in range(3)]
        np.testing.assert_allclose(modes, np.ravel(expected), atol=1e-7)


def test_layer_gradients_match_autograd():
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((5, 4)), rng.standard_normal((3, 5)), rng.standard_normal((2, 3))]
    x = rng.standard_normal((50, 4))
    y = rng.standard_normal((50, 2))
    sxx, syx = x.T @ x / 50, y.T @ x / 50
    ws = [torch.tensor(w, requires_grad=True) for w in weights]
    out = torch.tensor(x) @ ws[0].T @ ws[1].T @ ws[2].T
    loss = 0.5 * ((out - torch.tensor(y)) ** 2).sum(1).mean()
    grads = torch.autograd.grad(loss, ws)
    for g_np, g_t in zip(dl.layer_gradients(weights, sxx, syx), grads):
        np.testing.assert_allclose(g_np, g_t.numpy(), rtol=1e-10, atol=1e-12)


def test_balancedness_conserved_by_flow_and_gd_step_drift_is_exact():
    u_mat, v_mat, s, teacher = _teacher()
    rng = np.random.default_rng(3)
    weights = [0.3 * rng.standard_normal((7, 6)), 0.3 * rng.standard_normal((7, 7)), 0.3 * rng.standard_normal((6, 7))]
    flow = dl.gradient_flow(weights, np.eye(6), teacher, np.array([0.0, 2.0]))
    for d0, d1 in zip(dl.balancedness(flow.weights[0]), dl.balancedness(flow.weights[1])):
        np.testing.assert_allclose(d1, d0, atol=1e-8)
    # one GD step changes D_l by exactly eta^2 (G_{l+1}^T G_{l+1} - G_l G_l^T)
    eta = 0.05
    grads = dl.layer_gradients(weights, np.eye(6), teacher)
    stepped = [w - eta * g for w, g in zip(weights, grads)]
    for l, (after, before) in enumerate(zip(dl.balancedness(stepped), dl.balancedness(weights))):
        expected = eta ** 2 * (grads[l + 1].T @ grads[l + 1] - grads[l] @ grads[l].T)
        np.testing.assert_allclose(after - before, expected, atol=1e-12)


def test_gd_drift_is_eta_times_flow_integral():
    """GD from an unbalanced start: drift(t) / eta -> C(t) with an O(eta) error."""
    _, _, _, teacher = _teacher()
    rng = np.random.default_rng(4)
    weights = [0.3 * rng.standard_normal((6, 6)), 0.3 * rng.standard_normal((6, 6))]
    t_end = 1.0
    c = dl.gradient_flow(weights, np.eye(6), teacher, np.array([0.0, t_end])).drift_rate[-1][0]
    errors = []
    for eta in (4e-3, 2e-3, 1e-3):
        ws = [w.copy() for w in weights]
        for _ in range(int(round(t_end / eta))):
            grads = dl.layer_gradients(ws, np.eye(6), teacher)
            ws = [w - eta * g for w, g in zip(ws, grads)]
        drift = dl.balancedness(ws)[0] - dl.balancedness(weights)[0]
        errors.append(np.linalg.norm(drift / eta - c) / np.linalg.norm(c))
    assert errors[-1] < 0.01
    assert errors[0] / errors[-1] == pytest.approx(4.0, rel=0.1)  # first-order in eta


def test_effective_u0_predicts_random_init_half_times():
    u_mat, v_mat, s, teacher = _teacher(d=6, s=(3.0, 1.5, 0.75))
    rng = np.random.default_rng(5)
    width, sigma = 32, 1e-3
    w1, w2 = sigma * rng.standard_normal((width, 6)), sigma * rng.standard_normal((6, width))
    t = np.linspace(0, 14.0, 1401)
    flow = dl.gradient_flow([w1, w2], np.eye(6), teacher, t, rtol=1e-9, atol=1e-13)
    modes = np.array([np.diag(u_mat.T @ flow.end_to_end(k) @ v_mat) for k in range(len(t))])
    for m in range(3):
        predicted = dl.half_time(s[m], dl.effective_u0(w1, w2, u_mat[:, m], v_mat[:, m]))
        measured = np.interp(s[m] / 2, modes[:, m], t)
        assert measured == pytest.approx(predicted, rel=0.03)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="u0 must be in"):
        dl.mode_trajectory([0.0, 1.0], s=1.0, u0=2.0, depth=3)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        dl.half_time(1.0, 0.1, depth=0)
    with pytest.raises(ValueError, match="times must be >= 0"):
        dl.mode_trajectory([-1.0], 1.0, 0.1)
    with pytest.raises(ValueError, match="width"):
        dl.aligned_init(np.eye(3), np.eye(3), np.ones(3), depth=2, width=2)
