"""lmech.probes.self_influence: path self-influence against exact leave-one-out by retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lmech.models import MLP
from lmech.probes.gramian import PathRecorder, half_mse
from lmech.probes.path_loo import path_loo
from lmech.probes.self_influence import TracInSelfInfluence, path_self_influence, per_example_loss


def _gd(model, x, y, lr, steps, recorder=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if recorder is not None:
        recorder.start()
    for _ in range(steps):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        opt.step()
        if recorder is not None:
            recorder.step(lr)
    return model


def test_linear_model_matches_exact_leave_one_out_by_retraining():
    # p < n: gradient descent converges to least squares, where r_i / (1 - h_ii) is exact
    g = torch.Generator().manual_seed(0)
    n, p = 24, 4
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = nn.Linear(p, 1, bias=False).double()
    lr = 0.9 * n / float(torch.linalg.eigvalsh(x @ x.T)[-1])
    rec = PathRecorder(net, x, y, x[:2])
    _gd(net, x, y, lr, 400, rec)
    with torch.no_grad():
        u = net(x)
    si = path_self_influence(rec.path.D, u, y)
    exact = []
    for i in range(n):
        keep = torch.arange(n) != i
        w = torch.linalg.lstsq(x[keep], y[keep]).solution
        exact.append(0.5 * float((x[i] @ w - y[i]) ** 2) - 0.5 * float((u[i] - y[i]) ** 2))
    np.testing.assert_allclose(si.scores.numpy(), np.array(exact), rtol=1e-6, atol=1e-10)
    # the complexity measure is the LOO estimate minus the training loss
    assert si.complexity == pytest.approx(path_loo(rec.path.D, u, y).loo - float(half_mse(u, y)), rel=1e-10)


def test_small_mlp_matches_retraining_without_each_example():
    """A network at finite training time: the estimate is approximate (path_loo's bias before
    convergence); it must rank and size the self-influences like exact retraining (same init,
    same steps, the same per-example step size)."""
    from scipy.stats import spearmanr

    from lmech.experiments._signal import gd_step_size, initial_kernel

    g = torch.Generator().manual_seed(1)
    n, width, steps = 32, 32, 200
    x = torch.randn(n, 3, generator=g)
    y = torch.sign(x[:, :1] + 0.3 * torch.randn(n, 1, generator=g))
    y[:3] = -y[:3]                                         # three flipped labels
    torch.manual_seed(0)
    init = MLP(3, 1, width=width, depth=1)
    net = MLP(3, 1, width=width, depth=1)
    net.load_state_dict(init.state_dict())
    lr = gd_step_size(initial_kernel(net, x), 0.3)
    rec = PathRecorder(net, x, y, x[:2])
    _gd(net, x, y, lr, steps, rec)
    with torch.no_grad():
        u = net(x)
    si = path_self_influence(rec.path.D, u, y)
    exact = []
    for i in range(n):
        keep = torch.arange(n) != i
        m = MLP(3, 1, width=width, depth=1)
        m.load_state_dict(init.state_dict())
        # the loss is a mean: rescale lr so each remaining example gets the step it had in the full run
        _gd(m, x[keep], y[keep], lr * (n - 1) / n, steps)
        with torch.no_grad():
            exact.append(0.5 * float((m(x[i:i + 1]) - y[i]) ** 2) - 0.5 * float((u[i] - y[i]) ** 2))
    exact, est = np.array(exact), si.scores.numpy()
    assert spearmanr(est, exact).statistic > 0.9           # measured 0.97
    assert np.abs(est - exact).sum() / np.abs(exact).sum() < 0.15   # measured 0.07


def test_cross_entropy_reduces_to_leave_one_out_of_path_loo():
    torch.manual_seed(0)
    n, o = 6, 3
    A = torch.randn(n * o, n * o, dtype=torch.float64)
    D = 0.1 * A @ A.T
    u = torch.randn(n, o, dtype=torch.float64)
    y = torch.randint(0, o, (n,))
    si = path_self_influence(D, u, y, loss="cross_entropy")
    ref = path_loo(D, u, y, loss="cross_entropy")
    assert float(si.loo_loss.mean()) == pytest.approx(ref.loo, rel=1e-12)
    assert si.df == pytest.approx(ref.df, rel=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must be"):
        path_self_influence(torch.eye(3), torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="loss must be"):
        path_self_influence(torch.eye(4), torch.zeros(4, 1), torch.zeros(4, 1), loss="hinge")


def test_tracin_equals_autograd_loop_and_per_example_loss():
    torch.manual_seed(0)
    net = MLP(3, 1, width=8, depth=1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    tr = TracInSelfInfluence(net, half_mse, x, y)
    tr.step(lr=0.1, steps=3)
    ref = []
    for i in range(5):
        net.zero_grad()
        half_mse(net(x[i:i + 1]), y[i:i + 1]).backward()
        ref.append(0.3 * sum(float(p.grad.pow(2).sum()) for p in net.parameters()))
    np.testing.assert_allclose(tr.scores.numpy(), ref, rtol=1e-5)
    losses = per_example_loss(net, half_mse, x, y)
    with torch.no_grad():
        np.testing.assert_allclose(losses.numpy(), (0.5 * (net(x) - y) ** 2).squeeze(1).numpy(), rtol=1e-6)
