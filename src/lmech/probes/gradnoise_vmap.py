r"""The ``method="vmap"`` pass of :func:`lmech.probes.gradnoise.grad_noise`, for any model: a
rank's sufficient statistics from its per-example gradients (:func:`lmech.core.per_example_grads`),
in chunks of examples within a memory budget, reduced in place in the gradients' dtype and
combined over chunks in float64 (Chan, Golub & LeVeque 1979).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lmech.core.functional import FunctionalModel, per_example_grads
from lmech.errors import MemoryBudgetError


def _moments(G: Tensor, with_dot: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    r"""Column sums, column centered sums of squares, row squared norms and row dot products
    with the column sums of ``G`` (rows = examples, :math:`m` of them), all in ``G``'s dtype.
    ``G`` is overwritten (centered and squared in place).

    With :math:`s_k = \sum_i g_{ik}` and the rounded column mean :math:`\tilde m_k = s_k/m`:
    ``sq[i]`` :math:`= |g_i|^2`, ``dot[i]`` :math:`= g_i \cdot s` (``None`` unless
    ``with_dot``), and ``m2[k]`` :math:`= \sum_i (g_{ik} - \tilde m_k)^2`, the two-pass
    formula: no cancellation, and the error from rounding the mean, :math:`m(\tilde m_k - \bar
    g_k)^2`, is of relative size :math:`\epsilon^2 \bar g_k^2/\hat\sigma_k^2`. Five
    streaming passes over ``G`` (column sums, row norms, dots, centering, squaring) and one
    more for the column sums of squares; no temporary the size of ``G``. Column sums are
    matrix-vector products with a vector of ones.
    """
    ones = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    s = ones @ G  # a matrix-vector product: about twice as fast on CPU as G.sum(0)
    sq = torch.linalg.vector_norm(G, dim=1).square_()
    dot = torch.inner(G, s) if with_dot else None
    G.sub_(s / G.shape[0])
    G.mul_(G)
    return s, ones @ G, sq, dot

class _VmapPass:
    r"""Local sufficient statistics from per-example gradients (``method="vmap"``) on this rank's
    examples, in chunks of at most ``max_bytes``: column sums, per-example squared norms, then
    (:meth:`dots`) each example's dot product with the global column sums, and (:meth:`centered`)
    the centered sums of squares (:func:`_moments`, combined over chunks in float64 by Chan,
    Golub & LeVeque 1979). Unchunked, the gradients are computed once and kept between the
    steps; chunked, :meth:`dots` recomputes them (two passes)."""

    def __init__(self, fm: FunctionalModel, loss_fn: Callable, inputs: tuple, targets,
                 chunk_size: int | None, max_bytes: int | None, stderr: bool):
        self.fm, self.loss_fn, self.inputs, self.targets, self.chunk_size = fm, loss_fn, inputs, targets, chunk_size
        self.ok = True
        n = inputs[0].shape[0]
        item = max(p.element_size() for p in fm.params.values())
        per_example = fm.numel * item
        if max_bytes is None or n * per_example <= max_bytes:
            chunk = max(n, 1)
        else:
            chunk = int(max_bytes // per_example)
            if chunk < 1:
                raise MemoryBudgetError(
                    f"one example's gradient needs {per_example / 2**20:.1f} MiB > budget "
                    f"{max_bytes / 2**20:.1f} MiB; select fewer parameters (params=), or raise the budget")
        self.spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        self.names = fm.names
        self.sizes = [math.prod(fm.shapes[name]) for name in self.names]
        dt = torch.float64
        self._held = None
        self._moments: list[tuple[Tensor, Tensor, int]] = []  # per chunk (mean, m2, m), float64
        sums, sq_parts = None, []
        for a, c in self.spans:
            g = self._grads(a, c)
            rows = [g[name].reshape(c - a, -1) for name in self.names]
            s = torch.cat([torch.ones(c - a, dtype=r.dtype, device=r.device) @ r for r in rows]).to(dt)
            sums = s if sums is None else sums + s
            if stderr:
                sq_parts.append(torch.stack([torch.linalg.vector_norm(r, dim=1).square_() for r in rows]).to(dt))
            if len(self.spans) == 1:
                self._held = rows  # kept for the dots, then centered in place
            else:  # merged as they come: two P-sized float64 vectors, not two per chunk
                moments = [_moments(r, with_dot=False) for r in rows]
                self._moments = _merge(self._moments, torch.cat([mo[0] for mo in moments]).to(dt) / (c - a),
                                       torch.cat([mo[1] for mo in moments]).to(dt), c - a)
            del g, rows
        self.sums = sums
        self.sq = torch.cat(sq_parts, 1) if stderr else None

    def _grads(self, a: int, c: int) -> dict[str, Tensor]:
        xs = tuple(x[a:c] for x in self.inputs)
        ys = None if self.targets is None else self.targets[a:c]
        # (per_example_grads runs attention on kernels that vmap can batch by itself)
        return per_example_grads(self.fm, self.loss_fn, xs, ys, chunk_size=self.chunk_size, max_bytes=None)

    def dots(self, S: Tensor) -> Tensor:
        parts = S.split(self.sizes)
        if self._held is not None:
            return torch.stack([torch.inner(r, p.to(r.dtype)) for r, p in zip(self._held, parts)]).to(torch.float64)
        out = []
        for a, c in self.spans:
            g = self._grads(a, c)
            out.append(torch.stack([torch.inner(g[name].reshape(c - a, -1), p.to(g[name].dtype))
                                    for name, p in zip(self.names, parts)]))
        return torch.cat(out, 1).to(torch.float64)

    def uncentered(self) -> Tensor:
        """:math:`\\sum_i g_{ik}^2` over this rank's examples, float64 (several processes: added
        over ranks before centering about the global mean)."""
        if self._held is not None:
            return torch.cat([torch.linalg.vector_norm(r, dim=0).to(torch.float64).square_() for r in self._held])
        return sum(m2 + m * mean.square() for mean, m2, m in self._moments)

    def centered(self) -> Tensor:
        if self._held is not None:
            moments = [_moments(r, with_dot=False) for r in self._held]
            self._held = None
            m = self.spans[0][1]
            self._moments = [(torch.cat([mo[0] for mo in moments]).to(torch.float64) / m,
                              torch.cat([mo[1] for mo in moments]).to(torch.float64), m)]
        mean = m2 = None
        seen = 0
        for chunk_mean, chunk_m2, m in self._moments:
            if seen == 0:
                mean, m2 = chunk_mean, chunk_m2
            else:
                delta = chunk_mean - mean
                total = seen + m
                mean = mean + delta * (m / total)
                m2 = m2 + chunk_m2 + delta**2 * (seen * m / total)
            seen += m
        return m2


def _merge(moments: list[tuple[Tensor, Tensor, int]], mean: Tensor, m2: Tensor, m: int) -> list:
    """``[(mean, m2, count)]`` of the examples so far and of a new chunk, combined (Chan, Golub &
    LeVeque 1979; the same update as :meth:`_VmapPass.centered`)."""
    if not moments:
        return [(mean, m2, m)]
    (mean0, m20, seen), = moments
    total = seen + m
    delta = mean - mean0
    return [(mean0 + delta * (m / total), m20 + m2 + delta**2 * (seen * m / total), total)]
