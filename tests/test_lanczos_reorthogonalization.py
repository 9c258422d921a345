"""Lanczos with one Gram-Schmidt pass after the three-term recurrence (DGKS second pass only
when needed) against the CGS2 path and dense eigendecompositions (issue 18)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmech.core import lanczos
from lmech.models import MLP
from lmech.probes.sharpness import HessianOperator, sharpness

DT = torch.float64


def sym_with_spectrum(eigs: torch.Tensor, seed: int = 0, dtype=DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=g, dtype=DT))
    return ((Q * eigs.to(DT)) @ Q.T).to(dtype)


SPECTRA = {
    "outlier over a clustered bulk": torch.cat([torch.tensor([1000.0]), torch.linspace(0, 1, 199) ** 2]),
    "slow decay": 1.0 / torch.arange(1, 201, dtype=DT),
    "indefinite": torch.linspace(-3, 5, 200),
    "repeated top": torch.cat([torch.full((3,), 7.0), torch.rand(197, generator=torch.Generator().manual_seed(1))]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_dgks_equals_cgs2_and_eigvalsh(name, which):
    eigs = SPECTRA[name]
    A = sym_with_spectrum(eigs, seed=3)
    exact = torch.linalg.eigvalsh(A)
    want = {"LA": exact.flip(0), "SA": exact, "LM": exact[exact.abs().argsort(descending=True)]}[which][:5]
    for mode in ("dgks", "twice"):
        res = lanczos(lambda v: A @ v, 200, k=5, which=which, tol=1e-10, max_iter=200, dtype=DT,
                      reorthogonalize=mode)
        assert res.converged, (mode, name)
        torch.testing.assert_close(res.eigenvalues, want, rtol=1e-8, atol=1e-9)
        V = res.eigenvectors
        torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=DT), atol=1e-8, rtol=0)
        # the residual estimate is the true residual
        true = torch.linalg.vector_norm(A @ V - V * res.eigenvalues, dim=0)
        torch.testing.assert_close(res.residuals, true, atol=1e-8, rtol=1e-4)


def test_dgks_float32_runs_long_without_ghosts():
    # float32, 150 steps with a dominant eigenvalue converged early: the classic setting in which
    # Lanczos without reorthogonalization produces copies of the top eigenvalue
    eigs = torch.cat([torch.tensor([50.0, 49.0]), torch.linspace(0, 1, 298)])
    A = sym_with_spectrum(eigs, seed=4, dtype=torch.float32)
    res = lanczos(lambda v: A @ v, 300, k=4, tol=1e-12, max_iter=150, dtype=torch.float32)
    top = res.eigenvalues.tolist()
    assert top[0] == pytest.approx(50.0, rel=1e-5) and top[1] == pytest.approx(49.0, rel=1e-5)
    assert top[2] < 1.001  # no ghost copy of 50 or 49


def test_sharpness_dgks_equals_cgs2_and_the_dense_hessian_on_a_small_model():
    torch.manual_seed(0)
    net = MLP(6, 3, width=12, depth=2, activation="tanh").double()
    x = torch.randn(40, 6, dtype=DT)
    y = torch.randint(0, 3, (40,))
    op = HessianOperator(net, F.cross_entropy, (x, y))
    H = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=DT)])
    exact = torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:3]
    fast = sharpness(net, F.cross_entropy, (x, y), k=3, tol=1e-10, max_iter=op.dim)
    slow_op = HessianOperator(net, F.cross_entropy, (x, y))
    slow = lanczos(slow_op.matvec, slow_op.dim, k=3, tol=1e-10, max_iter=op.dim, dtype=DT,
                   reorthogonalize="twice", v0=torch.randn(op.dim, dtype=DT))
    torch.testing.assert_close(fast.eigenvalues, exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(slow.eigenvalues, exact, rtol=1e-8, atol=1e-10)


def test_bad_reorthogonalize_is_refused():
    with pytest.raises(ValueError, match="reorthogonalize"):
        lanczos(lambda v: v, 4, reorthogonalize="never")
