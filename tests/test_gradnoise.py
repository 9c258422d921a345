"""lmech.probes.gradnoise against brute-force leave-one-out computations and a closed form."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import MemoryBudgetError, per_example_grads
from lmech.probes.base import TrainState
from lmech.probes.gradnoise import GradNoiseProbe, grad_noise

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9,), generator=g)
    return model, x, y


def flat_grads(model, x, y, names=None):
    g = per_example_grads(model, F.cross_entropy, x, y)
    names = names or list(g)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], 1)


def test_doctests():
    module = importlib.import_module("lmech.probes.gradnoise")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


def test_per_coordinate_statistics_and_exact_leave_one_out():
    model, x, y = case()
    G = flat_grads(model, x, y)
    b = G.shape[0]
    gn = grad_noise(model, F.cross_entropy, (x, y))
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])  # noqa: E731
    torch.testing.assert_close(flat(gn.mean), G.mean(0))
    torch.testing.assert_close(flat(gn.variance), G.var(0, unbiased=True))
    # jackknife variance of the batch mean, brute force
    loo_means = torch.stack([torch.cat([G[:i], G[i + 1:]]).mean(0) for i in range(b)])
    jack = (b - 1) / b * ((loo_means - G.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(flat(gn.loo_variance), jack)
    # the unbiased signal is the mean of g_i . gbar_{-i} (the U-statistic over pairs i != j)
    u_stat = (G * loo_means).mean(0).sum()
    assert gn.total.signal == pytest.approx(float(u_stat), rel=1e-10)
    torch.testing.assert_close(flat(gn.snr), G.mean(0) ** 2 / jack)
    assert gn.total.gate_fraction == pytest.approx(float((G.mean(0) ** 2 > jack).double().mean()))


def test_group_statistics_and_jackknife_errors_brute_force():
    model, x, y = case()
    gn = grad_noise(model, F.cross_entropy, (x, y))
    assert list(gn.groups) == ["0", "2"]

    def stats(G):
        b = G.shape[0]
        m = G.mean(0)
        tr = G.var(0, unbiased=True).sum()
        ns = (m @ m) / (tr / b)
        denom = m @ m - tr / b
        return float(m @ m), float(tr), float(ns), float(tr / denom) if denom > 0 else math.inf

    def jack_se(G, idx):
        b = G.shape[0]
        vals = torch.tensor([stats(torch.cat([G[:i], G[i + 1:]]))[idx] for i in range(b)], dtype=DT)
        return float(((b - 1) / b * ((vals - vals.mean()) ** 2).sum()).sqrt())

    for label, names in [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]),
                         (None, ["0.weight", "0.bias", "2.weight", "2.bias"])]:
        G = flat_grads(model, x, y, names)
        res = gn.total if label is None else gn.groups[label]
        norm_sq, tr, snr, scale = stats(G)
        assert res.grad_norm_sq == pytest.approx(norm_sq, rel=1e-10)
        assert res.trace_cov == pytest.approx(tr, rel=1e-10)
        assert res.snr == pytest.approx(snr, rel=1e-10)
        assert res.noise_scale == pytest.approx(scale, rel=1e-10)
        assert res.snr_stderr == pytest.approx(jack_se(G, 2), rel=1e-8)
        if math.isfinite(res.noise_scale_stderr):
            assert res.noise_scale_stderr == pytest.approx(jack_se(G, 3), rel=1e-8)
        assert res.numel == G.shape[1]


def test_chunked_equals_unchunked():
    model, x, y = case()
    full = grad_noise(model, F.cross_entropy, (x, y))
    per_example = sum(p.numel() for p in model.parameters()) * 8
    chunked = grad_noise(model, F.cross_entropy, (x, y), max_bytes=2 * per_example + 1)
    for name in full.mean:
        torch.testing.assert_close(chunked.snr[name], full.snr[name], equal_nan=True)
    assert chunked.total.snr_stderr == pytest.approx(full.total.snr_stderr, rel=1e-10)
    assert chunked.groups["2"].noise_scale == pytest.approx(full.groups["2"].noise_scale, rel=1e-10)
    with pytest.raises(MemoryBudgetError, match="select fewer parameters"):
        grad_noise(model, F.cross_entropy, (x, y), max_bytes=10)


def test_noise_scale_closed_form():
    """loss_i = w * xi_i: per-example gradient xi_i, so B = sigma^2 / mu^2 exactly in expectation."""

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, xi):
            return self.w * xi

    mu, sigma, b = 0.5, 2.0, 4000
    xi = mu + sigma * torch.randn(b, generator=torch.Generator().manual_seed(0), dtype=DT)
    gn = grad_noise(Lin(), lambda out, _: out.mean(), (xi, None))
    expected = sigma**2 / mu**2  # 16
    assert abs(gn.total.noise_scale - expected) < 3 * gn.total.noise_scale_stderr
    assert gn.total.noise_scale_stderr < 0.2 * expected
    assert gn.total.snr == pytest.approx(b * float(xi.mean()) ** 2 / float(xi.var()), rel=1e-10)


def test_bad_input_and_probe():
    model, x, y = case()
    with pytest.raises(ValueError, match="at least 3"):
        grad_noise(model, F.cross_entropy, (x[:2], y[:2]))
    with pytest.raises(ValueError, match="unselected"):
        grad_noise(model, F.cross_entropy, (x, y), params="0", groups={"a": ["2.weight"]})
    out = GradNoiseProbe(per_coordinate=True).measure(TrainState(model, F.cross_entropy, (x, y)))
    assert {"grad_norm", "snr", "snr_stderr", "noise_scale", "snr/0", "gate_fraction/2"} <= set(out)
    assert out["coord_snr/0.weight"].shape == (20,)


def test_group_gsnr_and_gate_fraction_brute_force():
    """mean_gsnr and gate_fraction per group (assembled from per-tensor sums) against the
    concatenated per-example gradient matrix of that group."""
    model, x, y = case()
    gn = grad_noise(model, F.cross_entropy, (x, y))
    b = x.shape[0]
    for label, names in [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]),
                         (None, ["0.weight", "0.bias", "2.weight", "2.bias"])]:
        G = flat_grads(model, x, y, names)
        m, var = G.mean(0), G.var(0, unbiased=True)
        res = gn.total if label is None else gn.groups[label]
        keep = var > 0
        assert res.mean_gsnr == pytest.approx(float((m[keep] ** 2 / var[keep]).mean()), rel=1e-10)
        assert res.gate_fraction == pytest.approx(float((m**2 > var / b).double().mean()), rel=1e-12)
        assert res.signal == pytest.approx(float((m**2 - var / b).sum()), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_moments_match_brute_force(dtype):
    """The in-place fast reductions against float64 brute force on an offset matrix (mean far
    from zero: a naive sum-of-squares formula would cancel)."""
    from lmech.probes.gradnoise import _moments

    G = 3.0 + torch.randn(17, 20000, generator=torch.Generator().manual_seed(0))
    G = G.to(dtype)
    G64 = G.to(DT)
    s, m2, sq, dot = _moments(G.clone())
    assert s.dtype == m2.dtype == sq.dtype == dot.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(s.to(DT), G64.sum(0), **tol)
    torch.testing.assert_close(m2.to(DT) / 16, G64.var(0, unbiased=True), **tol)
    torch.testing.assert_close(sq.to(DT), (G64 * G64).sum(1), **tol)
    torch.testing.assert_close(dot.to(DT), G64 @ G64.sum(0), **tol)
    assert _moments(G.clone(), with_dot=False)[3] is None


def test_float32_model_matches_float64_brute_force():
    """A float32 model (reductions in float32, accumulated in float64) against the float64
    per-example gradient matrix of the same model."""
    model, x, y = case()
    m32 = model.float()
    gn = grad_noise(m32, F.cross_entropy, (x.float(), y))
    G = flat_grads(m32, x.float(), y).to(DT)
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])  # noqa: E731
    torch.testing.assert_close(flat(gn.mean).to(DT), G.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat(gn.variance).to(DT), G.var(0, unbiased=True), rtol=1e-4, atol=1e-9)
    b = G.shape[0]
    m, tr = G.mean(0), G.var(0, unbiased=True).sum()
    assert gn.total.grad_norm_sq == pytest.approx(float(m @ m), rel=1e-5)
    assert gn.total.trace_cov == pytest.approx(float(tr), rel=1e-5)
    assert gn.total.snr == pytest.approx(float((m @ m) / (tr / b)), rel=1e-4)
