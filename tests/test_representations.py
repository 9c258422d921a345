"""lmech.probes.representations: invariances, the p >> n pitfall, null calibration, references."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch import nn

from lmech.probes.base import TrainState
from lmech.probes.representations import (
    RepresentationProbe,
    layer_features,
    linear_cka,
    mutual_knn,
    similarity,
    svcca,
)

DT = torch.float64


def gauss(n, p, seed):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


def orthogonal(p, seed):
    Q, _ = torch.linalg.qr(gauss(p, p, seed))
    return Q


def test_doctests():
    module = importlib.import_module("lmech.probes.representations")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


def test_cka_matches_feature_space_formula_and_u_centering():
    X, Y = gauss(40, 7, 0), gauss(40, 5, 1) + gauss(40, 7, 0)[:, :5]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    feature_space = (Yc.T @ Xc).norm() ** 2 / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm())
    assert linear_cka(X, Y) == pytest.approx(float(feature_space), rel=1e-10)

    def u_center(K):  # Szekely & Rizzo: the unbiased HSIC is the inner product of U-centered Grams
        n = K.shape[0]
        K = K.clone()
        K.fill_diagonal_(0)
        U = K - K.sum(0, keepdim=True) / (n - 2) - K.sum(1, keepdim=True) / (n - 2) + K.sum() / ((n - 1) * (n - 2))
        U.fill_diagonal_(0)
        return U

    Ku, Lu = u_center(X @ X.T), u_center(Y @ Y.T)
    ref = (Ku * Lu).sum() / torch.sqrt((Ku * Ku).sum() * (Lu * Lu).sum())
    assert linear_cka(X, Y, debiased=True) == pytest.approx(float(ref), rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    X, Y = gauss(60, 10, 2), gauss(60, 12, 3)
    Y = Y + X @ gauss(10, 12, 4) * 0.5
    base = linear_cka(X, Y, debiased)
    assert 0.1 < base < 0.99
    assert linear_cka(X @ orthogonal(10, 5) * 7.0, Y, debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, 0.01 * Y @ orthogonal(12, 6), debiased) == pytest.approx(base, rel=1e-10)
    # not invariant to a general invertible map
    A = torch.diag(torch.linspace(0.1, 10, 10, dtype=DT))
    assert abs(linear_cka(X @ A, Y, debiased) - base) > 1e-3


def test_p_much_larger_than_n_biased_climbs_debiased_stays_near_zero():
    n = 100
    biased, debiased = [], []
    for p in (10, 100, 1000, 10_000):
        X, Y = gauss(n, p, 10), gauss(n, p, 11)
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert biased == sorted(biased) and biased[-1] > 0.95 and biased[0] < 0.3
    assert all(abs(d) < 0.05 for d in debiased)
    # the permutation null says the biased 0.99 is chance; calibrated CKA is 0
    X, Y = gauss(n, 10_000, 12), gauss(n, 10_000, 13)
    res = similarity(X, Y, "cka", permutations=60)
    assert res.score > 0.95 and res.p_value > 0.05 and res.calibrated == 0.0
    assert abs(res.null_mean - res.score) < 0.01


@pytest.mark.parametrize("metric", ["cka", "cka_debiased", "svcca", "mutual_knn"])
def test_permutation_null_detects_real_relation_and_not_independence(metric):
    X = gauss(120, 8, 20)
    related = X @ gauss(8, 6, 21) + 0.3 * gauss(120, 6, 22)
    independent = gauss(120, 6, 23)
    kw = dict(permutations=99, k=5, keep=4)
    hit = similarity(X, related, metric, **kw)
    miss = similarity(X, independent, metric, **kw)
    assert hit.p_value == pytest.approx(0.01) and hit.calibrated > 0.0
    assert miss.p_value > 0.05 and miss.calibrated == 0.0
    assert hit.null.shape == (99,)
    # the permuted scores are the metric on permuted rows (the shortcut is exact)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(120, generator=g)
    fn = {"cka": lambda a, b: linear_cka(a, b), "cka_debiased": lambda a, b: linear_cka(a, b, True),
          "svcca": lambda a, b: svcca(a, b, 4), "mutual_knn": lambda a, b: mutual_knn(a, b, 5)}[metric]
    assert hit.null[0] == pytest.approx(fn(X, related[perm]), rel=1e-10, abs=1e-12)


def test_svcca_and_knn_properties():
    X = gauss(200, 6, 30)
    assert svcca(X, X @ gauss(6, 6, 31)) == pytest.approx(1.0)
    # p >= n without truncation: CCA is trivially 1 even for independent data
    A, B = gauss(20, 30, 32), gauss(20, 30, 33)
    assert svcca(A, B, keep=1.0) == pytest.approx(1.0)
    assert svcca(A, B, keep=3) < 0.9
    chance = [mutual_knn(gauss(200, 5, s), gauss(200, 5, s + 100), k=10) for s in range(5)]
    assert abs(sum(chance) / 5 - 10 / 199) < 0.03
    # outliers: mutual-kNN barely moves, CKA swings (learning-mechanics.md §5.3 pitfall 3)
    Y = X + 0.2 * gauss(200, 6, 34)
    Xo, Yo = X.clone(), Y.clone()
    Xo[:2] *= 10
    assert abs(mutual_knn(Xo, Yo) - mutual_knn(X, Y)) < 0.02
    assert abs(linear_cka(Xo, Yo) - linear_cka(X, Y)) > abs(mutual_knn(Xo, Yo) - mutual_knn(X, Y))


def test_bad_input():
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(gauss(5, 2, 0), gauss(6, 2, 0))
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(torch.full((5, 2), math.nan), gauss(5, 2, 0))
    with pytest.raises(ValueError, match="metric"):
        similarity(gauss(5, 2, 0), gauss(5, 2, 1), "rsa")
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(gauss(5, 2, 0), gauss(5, 2, 1), k=5)
    assert math.isnan(linear_cka(torch.ones(5, 3), gauss(5, 2, 0)))
    with pytest.raises(ValueError, match="unknown module"):
        layer_features(nn.Linear(2, 2), torch.zeros(1, 2), ["nope"])


def test_probe_reference_and_change():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 5)
    state = TrainState(net, None, (x, None))
    probe = RepresentationProbe(permutations=19)
    first = probe.measure(state)
    assert first["cka/0"] == pytest.approx(1.0) and first["feature_change/0"] == 0.0
    assert first["knn/2"] == 1.0 and first["cka_debiased_p/0"] == pytest.approx(0.05)
    with torch.no_grad():
        net[0].weight.add_(torch.randn(16, 5))
    second = probe.measure(state)
    assert second["feature_change/0"] > 0.1 and second["cka/0"] < 1.0
