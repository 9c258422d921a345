"""Weight exponents in both conventions (issue 18): lmech's fit and WeightWatcher's, the conv
matrix convention, and no exponent for a layer with too few eigenvalues."""

from __future__ import annotations

import doctest
import importlib
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from lmech.probes.base import TrainState
from lmech.probes.weights import WeightSpectrumProbe, power_law_fit, weight_spectra
from lmech.probes.weightwatcher_fit import conv_slices, power_law_fit_weightwatcher


def spectra():
    """Eigenvalue sets like weight spectra: Marchenko-Pastur, heavy-tailed, Pareto, small."""
    rng = np.random.default_rng(0)
    mp = np.linalg.svd(rng.standard_normal((300, 200)) / np.sqrt(300), compute_uv=False) ** 2
    heavy = np.linalg.svd(rng.standard_t(2.5, (400, 150)) / 20, compute_uv=False) ** 2
    pareto = rng.random(500) ** (-1 / 2.0)
    small = np.linalg.svd(rng.standard_t(3.0, (30, 15)), compute_uv=False) ** 2  # 15 < 20
    return {"mp": mp, "heavy": heavy, "pareto": pareto, "small": small}


def test_doctests():
    module = importlib.import_module("lmech.probes.weightwatcher_fit")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("kind", ["mp", "heavy", "pareto", "small"])
def test_weightwatcher_convention_reproduces_weightwatcher_on_identical_eigenvalues(kind):
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    eig = spectra()[kind]
    ref = ww_powerlaw.pl_fit(data=eig[eig > 1e-5], xmax=None)  # what WeightWatcher.analyze calls
    ours = power_law_fit_weightwatcher(eig)
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-12)
    assert ours.xmin == ref.xmin and ours.n_tail == len(ref.data)
    assert ours.ks_distance == pytest.approx(ref.D, rel=1e-12)
    assert ours.stderr == pytest.approx(ref.sigma, rel=1e-12)


def test_one_sided_distance_is_the_formula_and_the_conventions_differ():
    eig = np.sort(spectra()["heavy"])
    ww = power_law_fit_weightwatcher(eig)
    tail = eig[eig >= ww.xmin]
    n = tail.size
    cdf = 1 - (tail / ww.xmin) ** (1 - ww.alpha)
    assert ww.alpha == pytest.approx(1 + n / np.log(tail / ww.xmin).sum(), rel=1e-12)
    assert ww.ks_distance == pytest.approx(np.max(np.abs(cdf - np.arange(n) / n)), rel=1e-12)
    ours = power_law_fit(eig)
    assert ours.alpha != pytest.approx(ww.alpha, rel=1e-3)  # a different cutoff rule


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 200),
                         nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_weight_spectra_in_weightwatcher_convention_equals_weightwatcher_analyze():
    weightwatcher = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    net = _net()
    df = weightwatcher.WeightWatcher(model=net).analyze()
    spec = weight_spectra(net, conv_matrix="slices")
    ref = dict(zip(df["name"].astype(str), df["alpha"]))
    # WeightWatcher names layers by module; the 10-eigenvalue layer it fits, lmech refuses
    assert set(ref) >= {"0", "3", "5"}
    for name in ("0", "3", "5"):
        s = spec[f"{name}.weight"]
        assert s.alpha_weightwatcher.alpha == pytest.approx(ref[name], rel=1e-6), name
    assert spec["7.weight"].alpha_weightwatcher is None and "too few" in spec["7.weight"].alpha_reason


def test_conv_matrix_convention_is_selectable_and_stated():
    net = _net()
    flat = weight_spectra(net)["0.weight"]
    sliced = weight_spectra(net, conv_matrix="slices")["0.weight"]
    assert flat.matrix == "flatten" and sliced.matrix == "slices"
    assert flat.singular_values.numel() == 32  # (32, 16 * 9): 32 singular values
    assert sliced.singular_values.numel() == 9 * 16  # nine (32, 16) slices
    expected = torch.linalg.svdvals(conv_slices(net[0].weight)).reshape(-1).sort(descending=True).values
    torch.testing.assert_close(sliced.singular_values, expected)
    # the norms are those of the (out, in * k) matrix in both conventions
    assert sliced.spectral_norm == pytest.approx(flat.spectral_norm, rel=1e-5)  # Lanczos, tol 1e-5
    assert weight_spectra(net)["3.weight"].matrix == "matrix"
    with pytest.raises(ValueError, match="conv_matrix"):
        weight_spectra(net, conv_matrix="fft")
    with pytest.raises(ValueError, match="conventions"):
        weight_spectra(net, conventions=("ww",))


def test_too_few_eigenvalues_give_a_reason_not_an_exponent():
    net = nn.Linear(10, 40)  # 10 eigenvalues
    s = weight_spectra(net)["weight"]
    assert s.alpha is None and s.alpha_weightwatcher is None
    assert "10 nonzero eigenvalues" in s.alpha_reason
    assert weight_spectra(net, fit_power_law=False)["weight"].alpha_reason is None
    wide = nn.Linear(60, 80)
    big = weight_spectra(wide)["weight"]  # 60 eigenvalues: both fits
    assert big.alpha is not None and big.alpha_weightwatcher is not None and big.alpha_reason is None
    only = weight_spectra(wide, conventions=("weightwatcher",))["weight"]
    assert only.alpha is None and only.alpha_weightwatcher.alpha == big.alpha_weightwatcher.alpha


def test_probe_reports_both_conventions():
    net = _net()
    state = TrainState(net, None, (torch.zeros(1, 16, 6, 6), None))
    out = WeightSpectrumProbe().measure(state)
    assert {"alpha/3.weight", "alpha_ww/3.weight", "alpha_mean", "alpha_ww_mean"} <= set(out)
    assert "alpha/7.weight" not in out  # 10 eigenvalues
    tiny = nn.Sequential(nn.Linear(4, 3))
    empty = WeightSpectrumProbe().measure(TrainState(tiny, None, (torch.zeros(1, 4), None)))
    assert math.isnan(empty["alpha_mean"]) and math.isnan(empty["alpha_ww_mean"])


@pytest.mark.parametrize("shape", [(70, 30), (30, 70), (50, 50)])
def test_gram_singular_values_equal_the_svd(shape):
    from lmech.probes.weights import _gram_singular_values

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sv = torch.linalg.svdvals(W)
    fast = _gram_singular_values(W)
    assert fast.shape == sv.shape
    torch.testing.assert_close(fast, sv, rtol=1e-10, atol=1e-10 * float(sv[0]))
    assert weight_spectra(nn.Linear(shape[1], shape[0]))["weight"].singular_values.shape == sv.shape
