"""lmech.probes.weights: power-law fits on synthetic Pareto samples, norms against closed forms."""

from __future__ import annotations

import doctest
import importlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lmech.probes.base import TrainState
from lmech.probes.weights import WeightSpectrumProbe, power_law_fit, spectral_norm, weight_spectra


def pareto(alpha, n, xmin=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return xmin * rng.random(n) ** (-1.0 / (alpha - 1.0))


def test_doctests():
    module = importlib.import_module("lmech.probes.weights")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("alpha", [1.8, 2.5, 3.5, 5.0])
def test_power_law_exponent_within_10_percent_with_a_bulk_below_xmin(alpha):
    rng = np.random.default_rng(1)
    tail = pareto(alpha, 3000, xmin=2.0, seed=int(alpha * 10))
    bulk = rng.uniform(0.05, 1.9, 3000)  # not a power law: xmin selection must cut it off
    fit = power_law_fit(np.concatenate([bulk, tail]))
    assert abs(fit.alpha - alpha) / alpha < 0.10
    assert fit.xmin >= 1.9  # the bulk is cut off
    assert fit.n_tail >= 1000 and fit.ks_distance < 0.05
    assert fit.stderr == pytest.approx((fit.alpha - 1) / np.sqrt(fit.n_tail))


def test_power_law_fixed_xmin_is_the_closed_form_mle():
    x = pareto(3.0, 500, xmin=1.0, seed=3)
    fit = power_law_fit(x, xmin=1.0)
    assert fit.alpha == pytest.approx(1 + 500 / np.log(x).sum())
    with pytest.raises(ValueError, match="at least"):
        power_law_fit([1.0, 2.0])
    with pytest.raises(ValueError, match="no valid xmin"):
        power_law_fit(np.ones(50))


def test_agrees_with_powerlaw_package_given_a_wide_alpha_range():
    powerlaw = pytest.importorskip("powerlaw")
    x = pareto(4.0, 600, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(x, verbose=False, parameter_ranges={"alpha": [1.01, 20.0]})
    ours = power_law_fit(x, min_tail=1)
    assert ours.alpha == pytest.approx(ref.power_law.alpha, rel=0.03)
    # and at the same xmin the estimates are the same MLE
    same = power_law_fit(x, xmin=float(ref.xmin))
    assert same.alpha == pytest.approx(ref.power_law.alpha, rel=1e-3)


def test_norms_stable_rank_and_relative_change():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Conv1d(2, 4, 3))
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net[0].weight.add_(0.1 * torch.randn(20, 30))
    spec = weight_spectra(net, reference=init)
    assert list(spec) == ["0.weight", "2.weight"]
    assert spec["2.weight"].shape == (4, 6)  # conv kernel read as (out, in * k)
    W = net[0].weight.detach().double()
    sv = torch.linalg.svdvals(W)
    s = spec["0.weight"]
    torch.testing.assert_close(s.singular_values, sv)
    assert s.spectral_norm == pytest.approx(float(torch.linalg.matrix_norm(W, 2)))
    assert s.stable_rank == pytest.approx(float((W**2).sum() / sv[0] ** 2))
    W0 = init["0.weight"].double()
    assert s.rel_change_op == pytest.approx(float(torch.linalg.matrix_norm(W - W0, 2) / torch.linalg.matrix_norm(W0, 2)))
    assert s.rel_change_fro == pytest.approx(float(torch.linalg.matrix_norm(W - W0) / torch.linalg.matrix_norm(W0)))
    # 20 and 4 eigenvalues: below min_eigenvalues=50, no fit and a reason instead
    assert s.alpha is None and "too few" in s.alpha_reason and spec["2.weight"].alpha is None
    assert spec["2.weight"].rel_change_op == 0.0
    with pytest.raises(ValueError, match="reference"):
        weight_spectra(net, reference={"0.weight": torch.zeros(3, 3)})


def test_probe_reference_is_taken_at_first_measurement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 2))
    state = TrainState(net, None, (torch.zeros(1, 40), None))
    probe = WeightSpectrumProbe(singular_values=True, min_eigenvalues=20)  # 30 eigenvalues
    first = probe.measure(state)
    assert first["rel_change_fro"] == 0.0 and first["rel_change_op/0.weight"] == 0.0
    assert {"alpha/0.weight", "alpha_mean", "stable_rank_mean", "max_spectral_norm"} <= set(first)
    assert first["singular_values/0.weight"].shape == (30,)
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    second = probe.measure(state)
    w0, w2 = net[0].weight.detach() / 1.5, net[2].weight.detach()
    expected = float((0.5 * w0).norm() / torch.sqrt(w0.norm() ** 2 + w2.norm() ** 2))
    assert second["rel_change_fro"] == pytest.approx(expected, rel=1e-6)
    assert second["rel_change_op/0.weight"] == pytest.approx(0.5, rel=1e-6)
    assert second["alpha/0.weight"] == pytest.approx(first["alpha/0.weight"], rel=1e-6)  # scale-free


def test_spectral_norm_lanczos_matches_svd_and_no_svd_mode():
    g = torch.Generator().manual_seed(0)
    for shape in [(300, 120), (80, 500), (30, 40)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert spectral_norm(W) == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-5)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 90), nn.Tanh(), nn.Linear(90, 70))
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net[0].weight.add_(0.05 * torch.randn(90, 100))
    full = weight_spectra(net, reference=init)
    light = weight_spectra(net, reference=init, fit_power_law=False, singular_values=False)
    for name in full:
        assert light[name].singular_values is None and light[name].alpha is None
        assert light[name].spectral_norm == pytest.approx(full[name].spectral_norm, rel=1e-5)
        assert light[name].stable_rank == pytest.approx(full[name].stable_rank, rel=2e-5)
        assert light[name].rel_change_op == pytest.approx(full[name].rel_change_op, rel=1e-4, abs=1e-12)
    with pytest.raises(ValueError, match="needs the singular values"):
        weight_spectra(net, fit_power_law=True, singular_values=False)


def test_warm_started_spectral_norm_equals_cold_and_zero_matrix():
    from lmech.probes.weights import spectral_norm_and_vector

    g = torch.Generator().manual_seed(3)
    W = torch.randn(200, 150, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(W, 2))
    cold, v = spectral_norm_and_vector(W)
    assert cold == pytest.approx(exact, rel=1e-5) and v.shape == (150,)
    W2 = W + 0.05 * torch.randn(200, 150, generator=g, dtype=torch.float64)
    warm, _ = spectral_norm_and_vector(W2, v)
    assert warm == pytest.approx(float(torch.linalg.matrix_norm(W2, 2)), rel=1e-5)
    assert warm == pytest.approx(spectral_norm(W2), rel=1e-5)
    # a start vector of the wrong length is ignored (cold start), the exact path returns None
    assert spectral_norm_and_vector(W2, torch.ones(7))[0] == pytest.approx(warm, rel=1e-5)
    assert spectral_norm_and_vector(W[:, :30])[1] is None
    assert spectral_norm_and_vector(torch.zeros(100, 120, dtype=torch.float64)) == (0.0, None)


def test_probe_warm_starts_give_the_svd_values_across_measurements():
    from lmech.probes.weights import WeightSpectrumProbe

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(120, 100), nn.Tanh(), nn.Linear(100, 90))
    state = TrainState(net, None, None)
    probe = WeightSpectrumProbe(fit_power_law=False)
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    for step in range(3):
        out = probe.measure(state)
        for name in ("0.weight", "2.weight"):
            W = net.get_parameter(name).detach().double()
            D = W - init[name].double()
            assert out[f"spectral_norm/{name}"] == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-5)
            expected = float(torch.linalg.matrix_norm(D, 2)) / float(torch.linalg.matrix_norm(init[name].double(), 2))
            assert out[f"rel_change_op/{name}"] == pytest.approx(expected, rel=1e-4, abs=1e-12)
        assert set(probe._start) == {"0.weight", "2.weight"}
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
