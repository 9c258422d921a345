"""Hutch++ at any product count, and contiguous vectors into every product (issue 18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmech.core import hutchinson_trace, hutchpp_trace, lanczos, slq
from lmech.probes.sharpness import HessianOperator, hessian_trace

DT = torch.float64


def sym(d: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, rank or d, generator=g, dtype=DT)
    return X @ X.T if rank else (X + X.T) / 2


@pytest.mark.parametrize("m", [5, 9, 15, 16, 17, 100, 1000])
def test_hutchpp_at_or_above_the_dimension_is_exact(m):
    A = sym(5, seed=1)
    est = hutchpp_trace(lambda v: A @ v, 5, num_matvecs=m, dtype=DT)
    assert abs(est.value - float(torch.trace(A))) < 1e-12
    assert est.num_matvecs == 5 and est.stderr == 0.0


def test_hutchpp_sketch_captures_a_low_rank_operator_exactly():
    # rank 3 <= s = 4 sketch columns: the deflated remainder is 0, so the estimate is exact
    A = sym(50, seed=2, rank=3)
    est = hutchpp_trace(lambda v: A @ v, 50, num_matvecs=12, dtype=DT)
    assert est.num_matvecs == 12
    assert abs(est.value - float(torch.trace(A))) < 1e-9 * float(torch.trace(A))


def _recording(A):
    seen = []

    def mv(v):
        seen.append(v.is_contiguous())
        return A @ v

    return mv, seen


def test_every_estimator_hands_contiguous_vectors_to_the_matvec():
    A = sym(40, seed=3)
    for run in (
        lambda mv: hutchpp_trace(mv, 40, 30, dtype=DT),
        lambda mv: hutchinson_trace(mv, 40, 10, dtype=DT),
        lambda mv: lanczos(mv, 40, k=3, dtype=DT),
        lambda mv: slq(mv, 40, num_probes=2, num_steps=10, dtype=DT),
    ):
        mv, seen = _recording(A)
        run(mv)
        assert seen and all(seen)


def _model_and_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(20, 6, dtype=DT)
    y = torch.randn(20, 3, dtype=DT)
    return net, (lambda o, t: 0.5 * ((o - t) ** 2).mean()), (x, y)


def test_hessian_operator_makes_strided_vectors_contiguous_with_the_same_product():
    net, loss, batch = _model_and_batch()
    op = HessianOperator(net, loss, batch)
    M = torch.randn(op.dim, 4, dtype=DT)
    col = M[:, 1]
    assert not col.is_contiguous()
    pieces = []
    inner = op._hvp

    def spy(v):
        pieces.extend(t.is_contiguous() for t in v.values())
        return inner(v)

    op._hvp = spy
    strided = op.matvec(col)
    assert pieces and all(pieces)
    assert torch.equal(strided, op.matvec(col.contiguous()))


def test_hessian_trace_above_three_times_the_dimension_is_the_explicit_trace():
    net, loss, batch = _model_and_batch()
    op = HessianOperator(net, loss, batch)
    explicit = sum(float(op.matvec(torch.eye(op.dim, dtype=DT)[i])[i]) for i in range(op.dim))
    est = hessian_trace(net, loss, batch, num_matvecs=3 * op.dim + 7)
    assert abs(est.value - explicit) < 1e-10 * abs(explicit)
    assert est.num_matvecs == op.dim
