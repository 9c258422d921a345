"""Batch sharpness against its definition: explicit minibatch Hessians and gradients, every batch."""

import itertools

import pytest
import torch
from torch import nn

from lmech.probes import BatchSharpnessProbe, TrainState, batch_sharpness


def _mse(out, target):
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    return net, x, y


def _explicit(net, x, y):
    """g^T H g / |g|^2 with H from torch.autograd.functional.hessian of the flat parameter vector."""
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        ps, i = [], 0
        for s in shapes:
            k = int(torch.tensor(s).prod())
            ps.append(flat[i:i + k].reshape(s))
            i += k
        w1, b1, w2, b2 = ps
        return _mse(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    g = torch.autograd.functional.jacobian(loss, flat0)
    h = torch.autograd.functional.hessian(loss, flat0)
    return float(g @ h @ g), float(g @ g)


@pytest.mark.parametrize("b", [1, 2, 3, 7])
def test_every_batch_equals_the_explicit_expectation(b):
    net, x, y = _tiny()
    batches = [torch.tensor(c) for c in itertools.combinations(range(7), b)]
    explicit = [_explicit(net, x[i], y[i]) for i in batches]
    exact = sum(c / q for c, q in explicit) / len(explicit)
    exact_rm = sum(c for c, _ in explicit) / sum(q for _, q in explicit)
    res = batch_sharpness(net, _mse, (x, y), b, batches=batches)
    assert res.num_batches == len(batches)
    assert res.value == pytest.approx(exact, rel=1e-10)
    assert batch_sharpness(net, _mse, (x, y), b, batches=batches, ratio_of_means=True).value == pytest.approx(
        exact_rm, rel=1e-10)


def test_monte_carlo_estimate_is_within_its_error_and_full_batch_is_one_quotient():
    net, x, y = _tiny()
    batches = [torch.tensor(c) for c in itertools.combinations(range(7), 3)]
    exact = batch_sharpness(net, _mse, (x, y), 3, batches=batches).value
    mc = batch_sharpness(net, _mse, (x, y), 3, num_batches=400, seed=1)
    assert abs(mc.value - exact) < 4 * mc.stderr
    full = batch_sharpness(net, _mse, (x, y), 7, num_batches=50)
    c, q = _explicit(net, x, y)
    assert full.num_batches == 1 and full.value == pytest.approx(c / q, rel=1e-10)


def test_probe_and_bad_input():
    net, x, y = _tiny()
    out = BatchSharpnessProbe(batch_size=2, num_batches=8).measure(TrainState(net, _mse, (x, y), step=3))
    assert set(out) == {"batch_sharpness", "batch_sharpness_stderr"} and out["batch_sharpness_stderr"] >= 0
    with pytest.raises(ValueError, match="batch_size"):
        batch_sharpness(net, _mse, (x, y), 8)
    with pytest.raises(ValueError, match="zero"):
        batch_sharpness(net, lambda o, t: 0.0 * o.sum(), (x, y), 2, num_batches=2)
