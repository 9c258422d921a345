"""lmech.core.linalg against torch.linalg.eigvalsh and exact traces of explicit matrices."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import lmech.core.linalg as linalg
from lmech.core import (
    MemoryBudgetError,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq,
)

DT = torch.float64


def sym_with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    d = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return (Q * eigs.to(DT)) @ Q.T


def random_sym(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g, dtype=DT)
    return (X + X.T) / 2


def counted(A):
    calls = {"n": 0}

    def mv(v):
        calls["n"] += 1
        return A @ v

    return mv, calls


def test_doctests():
    assert doctest.testmod(linalg, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_matches_eigvalsh(which):
    A = random_sym(60, seed=1)
    ev = torch.linalg.eigvalsh(A)
    order = {"LA": ev.flip(0), "SA": ev, "LM": ev[torch.argsort(ev.abs(), descending=True)]}[which]
    mv, calls = counted(A)
    res = lanczos(mv, 60, k=3, which=which, tol=1e-10, dtype=DT, max_iter=60)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, order[:3], rtol=1e-9, atol=1e-9)
    assert res.num_matvecs == calls["n"]


def test_lanczos_residual_estimate_is_the_true_residual():
    A = sym_with_spectrum(torch.cat([torch.tensor([50.0, 30.0, 29.0]), torch.rand(197)]))
    res = lanczos(lambda v: A @ v, 200, k=3, tol=1e-4, dtype=DT)
    assert res.converged and res.num_matvecs < 200
    Y = res.eigenvectors
    true_resid = torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0)
    torch.testing.assert_close(res.residuals, true_resid, rtol=1e-4, atol=1e-10)
    assert (res.relative_residuals <= 1e-4).all()
    # the certificate: an exact eigenvalue lies within the residual of every Ritz value
    exact = torch.tensor([50.0, 30.0, 29.0], dtype=DT)
    assert ((res.eigenvalues - exact).abs() <= res.residuals + 1e-12).all()
    torch.testing.assert_close(Y.T @ Y, torch.eye(3, dtype=DT), atol=1e-8, rtol=0)


def test_lanczos_quadratic_with_known_spectrum_float32():
    eigs = torch.linspace(-3.0, 10.0, 300)
    A = sym_with_spectrum(eigs, seed=2).float()
    res = lanczos(lambda v: A @ v, 300, k=4, tol=1e-3, dtype=torch.float32)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues.float(), eigs.flip(0)[:4], rtol=1e-3, atol=0)


def test_lanczos_repeated_eigenvalues_restart_after_invariant_subspace():
    # diag(5, 5, 5, 1, ...): a Krylov space from one vector sees the eigenvalue 5 once; the
    # invariant-subspace restart is needed to find its multiplicity
    eigs = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 0.5])
    A = sym_with_spectrum(eigs, seed=3)
    res = lanczos(lambda v: A @ v, 6, k=3, tol=1e-10, dtype=DT)
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 5.0, dtype=DT))


def test_lanczos_warm_start_converges_at_once():
    A = sym_with_spectrum(torch.linspace(0, 1, 100) ** 3, seed=4)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    res = lanczos(lambda v: A @ v, 100, tol=1e-6, dtype=DT, v0=top)
    assert res.converged and res.num_matvecs <= 2


def test_lanczos_does_not_touch_the_global_rng():
    A = random_sym(30)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lanczos(lambda v: A @ v, 30, dtype=DT)
    slq(lambda v: A @ v, 30, dtype=DT)
    hutchpp_trace(lambda v: A @ v, 30, dtype=DT)
    assert torch.equal(before, torch.get_rng_state())


def test_lanczos_callback_traces_every_product():
    A = sym_with_spectrum(torch.linspace(0, 1, 50) ** 2, seed=12)
    seen = []
    res = lanczos(lambda v: A @ v, 50, k=2, tol=1e-8, dtype=DT,
                  callback=lambda m, theta, r: seen.append((m, theta, r)))
    assert [m for m, _, _ in seen] == list(range(2, res.num_matvecs + 1))
    torch.testing.assert_close(seen[-1][1], res.eigenvalues)
    torch.testing.assert_close(seen[-1][2], res.residuals)
    tops = [float(t[0]) for _, t, _ in seen]
    assert all(a <= b + 1e-12 for a, b in zip(tops, tops[1:]))  # Ritz values grow monotonically


def test_lanczos_not_converged_is_reported():
    A = sym_with_spectrum(torch.linspace(0, 1, 400), seed=5)  # no gap at the top
    res = lanczos(lambda v: A @ v, 400, tol=1e-12, max_iter=5, dtype=DT)
    assert not res.converged and res.num_matvecs == 5


def test_lanczos_memory_refusal_and_bad_input():
    with pytest.raises(MemoryBudgetError, match="Lanczos basis.*lower max_iter"):
        lanczos(lambda v: v, 10_000, max_iter=50, max_bytes=1000)
    assert issubclass(MemoryBudgetError, MemoryError)
    with pytest.raises(ValueError, match="which"):
        lanczos(lambda v: v, 5, which="XX")
    with pytest.raises(ValueError, match="k must be"):
        lanczos(lambda v: v, 5, k=6)
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * float("nan"), 5)


def test_hutchinson_is_unbiased_with_honest_stderr():
    A = random_sym(50, seed=6)
    exact = float(torch.trace(A))
    est = hutchinson_trace(lambda v: A @ v, 50, num_samples=400, dtype=DT)
    assert est.num_matvecs == 400
    # Rademacher variance per sample: 2(||A||_F^2 - sum A_ii^2)
    sd = math.sqrt(2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum())) / 400)
    assert abs(est.stderr / sd - 1) < 0.2
    assert abs(est.value - exact) < 4 * sd


def test_hutchpp_exact_when_sketch_spans_and_beats_hutchinson_on_decaying_spectrum():
    A = sym_with_spectrum(torch.tensor([9.0, 4.0, 1.0, 0.5]), seed=7)
    est = hutchpp_trace(lambda v: A @ v, 4, num_matvecs=12, dtype=DT)
    assert abs(est.value - 14.5) < 1e-10
    # decaying spectrum: Hutch++ error far below Hutchinson's at the same number of products
    eigs = 1.0 / torch.arange(1, 201, dtype=DT) ** 2
    B = sym_with_spectrum(eigs, seed=8)
    exact = float(eigs.sum())
    errs_pp, errs_h = [], []
    for seed in range(10):
        errs_pp.append(abs(hutchpp_trace(lambda v: B @ v, 200, 60, seed=seed, dtype=DT).value - exact))
        errs_h.append(abs(hutchinson_trace(lambda v: B @ v, 200, 60, seed=seed, dtype=DT).value - exact))
    assert sum(errs_pp) < 0.25 * sum(errs_h)
    with pytest.raises(MemoryBudgetError, match="Hutch\\+\\+"):
        hutchpp_trace(lambda v: v, 10_000, 30, max_bytes=10_000)


def test_slq_quadrature_reproduces_moments_exactly():
    # m Lanczos steps integrate polynomials of degree <= 2m - 1 exactly: v^T A^p v
    A = random_sym(80, seed=9)
    sd = slq(lambda v: A @ v, 80, num_probes=3, num_steps=6, seed=1, dtype=DT)
    gen = torch.Generator().manual_seed(1)
    for probe in range(3):
        z = linalg._rademacher(80, gen, DT, None)
        v = z / z.norm()
        for p in range(0, 12):
            exact = float(v @ torch.linalg.matrix_power(A, p) @ v)
            quad = float((sd.weights[probe] * sd.nodes[probe] ** p).sum())
            assert abs(quad - exact) <= 1e-8 * max(1.0, abs(exact)), (probe, p)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(3, dtype=DT))


def test_slq_density_close_to_explicit():
    eigs = torch.cat([torch.randn(150, generator=torch.Generator().manual_seed(0)) * 0.3,
                      torch.tensor([4.0, 6.0])]).to(DT)
    A = sym_with_spectrum(eigs, seed=10)
    sd = slq(lambda v: A @ v, 152, num_probes=30, num_steps=40, dtype=DT)
    grid = torch.linspace(-2, 7, 400, dtype=DT)
    sigma = 0.2
    exact = (torch.exp(-0.5 * ((grid[:, None] - eigs) / sigma) ** 2)
             / (sigma * math.sqrt(2 * math.pi))).mean(1)
    est = sd.density(grid, sigma)
    dx = float(grid[1] - grid[0])
    assert abs(float(est.sum()) * dx - 1) < 0.02  # a density
    assert float((est - exact).abs().sum()) * dx < 0.1  # L1 distance between densities
    # trace of f(A) via the quadrature
    assert abs(sd.trace(lambda t: t) - float(eigs.sum())) < 0.1 * float(eigs.abs().sum())
    assert sd.num_matvecs == 30 * 40


def test_slq_handles_low_rank_breakdown():
    eigs = torch.tensor([3.0, 1.0] + [0.0] * 18)
    A = sym_with_spectrum(eigs, seed=11)
    sd = slq(lambda v: A @ v, 20, num_probes=2, num_steps=10, dtype=DT)
    assert torch.isfinite(sd.nodes).all()
    assert abs(sd.trace(lambda t: t**2) / 20 - 10 / 20) < 0.5  # tr A^2 = 10, noisy with 2 probes


def test_lanczos_matvec_returning_its_input_does_not_corrupt_the_basis():
    # identity-like operators may return the very tensor they were given (or a view of it):
    # the reorthogonalization must not write into the basis row it reads from
    res = lanczos(lambda v: v, 12, k=2, tol=1e-10, dtype=DT)
    torch.testing.assert_close(res.eigenvalues, torch.ones(2, dtype=DT))
    res = lanczos(lambda v: v.view(3, 4).reshape(-1), 12, k=1, tol=1e-10, dtype=DT)  # a view
    torch.testing.assert_close(res.eigenvalues, torch.ones(1, dtype=DT))


def test_lanczos_basis_stays_orthogonal_on_a_clustered_spectrum():
    """CGS2 keeps the Ritz values ghost-free: with a spectrum that makes plain Lanczos lose
    orthogonality (a dominant eigenvalue converging early), the top-5 still match eigvalsh."""
    eigs = torch.cat([torch.tensor([1000.0]), torch.linspace(0, 1, 199) ** 2])
    A = sym_with_spectrum(eigs, seed=21)
    res = lanczos(lambda v: A @ v, 200, k=5, tol=1e-10, max_iter=200, dtype=DT)
    torch.testing.assert_close(res.eigenvalues, eigs.to(DT).sort(descending=True).values[:5], rtol=1e-8, atol=1e-9)
