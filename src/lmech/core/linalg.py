r"""Matrix-free linear algebra for a symmetric operator :math:`A \in \mathbb{R}^{d \times d}`.

The operator is given only as a *matvec* ``v -> A v`` on flat 1-D tensors of length ``d`` (e.g. a
Hessian-vector product wrapped by :mod:`lmech.probes.sharpness`). Nothing here forms :math:`A`.

* :func:`lanczos` — top-k (or bottom-k, or largest-magnitude) eigenpairs by the Lanczos process
  with full reorthogonalization, stopping on a residual certificate.
* :func:`hutchinson_trace` and :func:`hutchpp_trace` — stochastic trace estimates with a
  standard error.
* :func:`slq` — stochastic Lanczos quadrature: an estimate of the spectral density
  :math:`\phi(t) = \frac1d \sum_i \delta(t - \lambda_i)` and of :math:`\operatorname{tr} f(A)`.

Randomness: every function draws its probe vectors from the ``generator`` it is given (a fresh
``torch.Generator`` seeded with ``seed`` otherwise), never from the global RNG, so calling them
does not change a training run's random stream.

Memory: the Lanczos basis (``max_iter + 1`` vectors of length ``d``) and the Hutch++ sketch are
the only large allocations; their bytes are computed first and :class:`MemoryBudgetError` is raised
above ``max_bytes`` with a line saying what to shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from lmech.core.functional import DEFAULT_MAX_BYTES
from lmech.errors import MemoryBudgetError

__all__ = [
    "Matvec",
    "MemoryBudgetError",
    "check_memory",
    "lanczos_memory_check",
    "EigenResult",
    "lanczos",
    "TraceEstimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "SpectralDensity",
    "slq",
]

Matvec = Callable[[Tensor], Tensor]
"""A symmetric linear map on flat vectors: ``matvec(v)`` returns :math:`A v` (same shape, 1-D)."""




def check_memory(nbytes: int, max_bytes: int | None, what: str, shrink: str) -> None:
    """Raise :class:`MemoryBudgetError` (one line) when ``nbytes > max_bytes``.

    ``what`` names the allocation, ``shrink`` says how to make it smaller.
    """
    if max_bytes is not None and nbytes > max_bytes:
        raise MemoryBudgetError(
            f"{what} needs {nbytes / 2**20:.1f} MiB > budget {max_bytes / 2**20:.1f} MiB; "
            f"{shrink}, or raise the budget"
        )


def lanczos_memory_check(dim: int, k: int, max_iter: int | None, dtype: torch.dtype | None,
                         max_bytes: int | None) -> int:
    """The number of Lanczos steps :func:`lanczos` would take at most (``max_iter``, default
    ``max(2k + 40, 80)``, capped at ``dim``), after checking that its basis of that many plus one
    vectors fits ``max_bytes`` (:class:`MemoryBudgetError` otherwise). Callers that do expensive
    work before :func:`lanczos` (a gradient start) call it first, so that they refuse at once."""
    m_max = min(dim, max(2 * k + 40, 80)) if max_iter is None else min(int(max_iter), dim)
    if m_max < k:
        raise ValueError(f"max_iter={m_max} < k={k}; raise max_iter")
    itemsize = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    check_memory((m_max + 1) * dim * itemsize, max_bytes, f"the Lanczos basis ({m_max + 1} x {dim})",
                 "lower max_iter or select fewer parameters")
    return m_max


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def _rademacher(n: int, gen: torch.Generator, dtype, device) -> Tensor:
    z = torch.randint(0, 2, (n,), generator=gen).to(dtype=dtype, device=device)
    return 2 * z - 1


# --------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------


@dataclass
class EigenResult:
    r"""Ritz approximations from :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values :math:`\theta_i`, ordered by ``which`` (``"LA"``:
            descending; ``"SA"``: ascending; ``"LM"``: descending magnitude).
        eigenvectors: ``(d, k)`` unit Ritz vectors :math:`y_i` (``None`` if not requested).
        residuals: ``(k,)`` residual norms :math:`r_i = \|A y_i - \theta_i y_i\|`, from the
            Lanczos identity :math:`r_i = \beta_m |s_{m,i}|` (exact in exact arithmetic; full
            reorthogonalization keeps it accurate in floating point). Certificate: :math:`A` has an
            eigenvalue within :math:`r_i` of :math:`\theta_i`, and within :math:`r_i^2/\gamma_i`
            when the rest of the spectrum is at distance :math:`\ge \gamma_i`.
        converged: whether every requested pair reached ``residual <= tol * |theta|``.
        num_matvecs: products with :math:`A` used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    num_matvecs: int

    @property
    def relative_residuals(self) -> Tensor:
        r""":math:`r_i / |\theta_i|` (an upper bound on the relative eigenvalue error)."""
        return self.residuals / self.eigenvalues.abs().clamp_min(torch.finfo(torch.float64).tiny)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted Ritz values (``theta`` ascending, from ``eigh``)."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    which: Literal["LA", "SA", "LM"] = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_vectors: bool = True,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    reorthogonalize: Literal["dgks", "twice"] = "dgks",
) -> EigenResult:
    r"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Builds an orthonormal Krylov basis :math:`Q_m = [q_1, \dots, q_m]` of
    :math:`\mathcal K_m(A, v_0)` and the tridiagonal :math:`T_m = Q_m^\top A Q_m` (entries
    :math:`\alpha_j = q_j^\top A q_j`, :math:`\beta_j = \|w_j\|`), with
    :math:`A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top`. Each new vector is orthogonalized against
    the whole basis, which prevents the ghost eigenvalues of plain Lanczos, in one of two ways:

    * ``"dgks"`` (default): the three-term recurrence
      :math:`w \leftarrow Aq_j - \alpha_j q_j - \beta_{j-1} q_{j-1}` first (two vectors), then one
      classical Gram-Schmidt pass against the whole basis, and a second pass only when the
      first removed more than :math:`1 - 1/\sqrt2` of the norm (the Daniel-Gragg-Kaufman-Stewart
      criterion, 1976). After the recurrence the components along the basis are rounding
      errors, so the first pass is almost never large and the second almost never runs: two
      passes over the basis per step instead of four. At millions of parameters the passes
      over the basis cost as much as the Hessian-vector products themselves, so this matters
      (measurements in ``docs/results/probes.md``).
    * ``"twice"``: classical Gram-Schmidt twice on :math:`Aq_j` itself, no recurrence first
      ("twice is enough", Parlett; four passes over the basis per step), the previous default. After every product the Ritz pairs :math:`(\theta_i, y_i = Q_m s_i)` of
    :math:`T_m` are computed and the run stops when the ``k`` requested ones satisfy
    :math:`r_i = \beta_m |e_m^\top s_i| \le \mathrm{tol}\,|\theta_i|` (Golub & Van Loan,
    *Matrix Computations*, §10.1). If the Krylov space becomes invariant (:math:`\beta_m \approx 0`),
    a random vector orthogonal to the basis restarts it, so repeated eigenvalues are found with
    their multiplicity in that case; otherwise (as with any single-vector Krylov method) a copy
    of a repeated eigenvalue appears only through rounding, and ``k`` larger than the number of
    distinct top eigenvalues may report the next distinct ones.

    Args:
        matvec: ``v -> A v`` for 1-D tensors of length ``dim``; :math:`A` must be symmetric.
        dim: :math:`d`.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (e.g. sharpness), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative residual target.
        max_iter: most products (default ``min(dim, max(2k + 40, 80))``). Not converged at the end
            gives ``converged=False`` and the current Ritz values.
        v0: starting vector (e.g. the previous top eigenvector, a warm start); random Gaussian
            from ``generator`` otherwise.
        dtype, device: of the basis (default: ``v0``'s, else the default dtype, CPU).
        return_vectors: also return the Ritz vectors (``dim x k``).
        max_bytes: budget for the basis, ``(max_iter + 1) * dim * itemsize`` bytes.
        callback: called after every product (once ``k`` Ritz values exist) with
            ``(num_matvecs, ritz_values, residuals)`` of the requested pairs (progress, traces).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = lanczos(lambda v: A @ v, 100, k=2, dtype=torch.float64, tol=1e-8)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()], res.converged
        ([100.0, 99.0], True)
    """
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    if reorthogonalize not in ("dgks", "twice"):
        raise ValueError(f"reorthogonalize must be 'dgks' or 'twice', got {reorthogonalize!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, dim={dim}], got {k}")
    if v0 is not None:
        dtype = v0.dtype if dtype is None else dtype
        device = v0.device if device is None else device
    dtype = dtype or torch.get_default_dtype()
    m_max = lanczos_memory_check(dim, k, max_iter, dtype, max_bytes)
    gen = _generator(generator, seed)

    Q = torch.empty(m_max + 1, dim, dtype=dtype, device=device)  # row j is written before it is read
    if v0 is None:
        v0 = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    v0 = v0.reshape(-1).to(dtype=dtype, device=device)
    if v0.numel() != dim:
        raise ValueError(f"v0 has {v0.numel()} entries, expected dim={dim}")
    norm = torch.linalg.vector_norm(v0)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("v0 must be a finite non-zero vector")
    Q[0] = v0 / norm

    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0.0 marks a restart
    # the tridiagonal, filled as it grows; its small eigenproblems are solved with NumPy (same
    # LAPACK routine as torch, without the per-call dispatch cost of tiny tensors)
    T = np.zeros((m_max, m_max))
    theta = resid = S = sel = None
    converged = False
    scale = 0.0
    scratch = None  # dgks: buffers for alpha q_j and w - alpha q_j
    for j in range(m_max):
        w = matvec(Q[j]).reshape(-1).to(dtype)
        if w.numel() != dim:
            raise ValueError(f"matvec returned {w.numel()} entries, expected dim={dim}")
        # Full reorthogonalization by classical Gram-Schmidt, twice (CGS2; "twice is enough"):
        # w <- w - Q^T (Q w) removes alpha_j q_j and beta_{j-1} q_{j-1} (the three-term recurrence)
        # and every rounding-error component along the basis; alpha_j = q_j^T A q_j is the
        # coefficient on q_j summed over both passes. Out of place first: w may alias Q[j].
        basis = Q[: j + 1]
        if reorthogonalize == "twice":
            h = basis @ w
            w = torch.addmv(w, basis.T, h, alpha=-1)
            h2 = basis @ w
            w.addmv_(basis.T, h2, alpha=-1)
            alpha = float(h[j]) + float(h2[j])
            beta = float(torch.linalg.vector_norm(w))
        else:
            # three-term recurrence (out of place: w may alias Q[j]), then one full pass, and
            # a second where the first removed a large part (DGKS, eta = 1/sqrt 2)
            alpha = float(torch.dot(Q[j], w))
            # w - alpha q_j into reused buffers: the same two roundings as the out-of-place
            # expression, matvec's output left untouched, and no fresh dim-long allocation per
            # step (at millions of entries each is a page-faulting mmap, slower than a pass)
            if scratch is None:
                scratch = (torch.empty_like(w), torch.empty_like(w))
            torch.mul(Q[j], alpha, out=scratch[0])
            w = torch.sub(w, scratch[0], out=scratch[1])
            if j > 0 and betas[-1] != 0.0:
                w.sub_(Q[j - 1], alpha=betas[-1])
            before = float(torch.linalg.vector_norm(w))
            h = basis @ w
            w.addmv_(basis.T, h, alpha=-1)
            alpha += float(h[j])
            beta = float(torch.linalg.vector_norm(w))
            if beta < 0.7071067811865476 * before:
                h = basis @ w
                w.addmv_(basis.T, h, alpha=-1)
                alpha += float(h[j])
                beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        if not math.isfinite(beta) or not math.isfinite(alpha):
            raise FloatingPointError("Lanczos produced a non-finite value: the operator returned NaN/inf")

        T[j, j] = alpha
        if j > 0:
            T[j, j - 1] = T[j - 1, j] = betas[-1]
        theta, S = np.linalg.eigh(T[: j + 1, : j + 1])
        scale = max(scale, float(np.abs(theta).max()))
        full = j + 1 == dim
        invariant = full or beta <= 1e-10 * max(scale, 1e-300)
        resid = (0.0 if invariant else beta) * np.abs(S[-1])
        # On an invariant subspace every Ritz pair is exact, but eigenvalues whose eigenvectors
        # the start vector missed (repeated ones) are absent: restart before judging convergence.
        if j + 1 >= k and callback is not None:
            chosen = _select(theta, k, which)
            callback(j + 1, torch.from_numpy(theta[chosen].copy()), torch.from_numpy(resid[chosen].copy()))
        if j + 1 >= k and (full or not invariant):
            sel = _select(theta, k, which)
            floor = 1e-8 * scale  # eigenvalues ~0 converge in absolute terms
            if bool((resid[sel] <= tol * np.maximum(np.abs(theta[sel]), floor)).all()):
                converged = True
                break
        if j + 1 == m_max:
            break
        if invariant:  # restart in the orthogonal complement of the basis
            w = torch.randn(dim, generator=gen, dtype=dtype).to(device)
            for _ in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            Q[j + 1] = w / torch.linalg.vector_norm(w)
            betas.append(0.0)
        else:
            torch.div(w, beta, out=Q[j + 1])
            betas.append(beta)

    m = len(alphas)
    if sel is None:
        sel = _select(theta, k, which)
    vectors = None
    if return_vectors:
        vectors = Q[:m].T @ torch.from_numpy(S[:, sel]).to(dtype=dtype, device=Q.device)
    return EigenResult(
        eigenvalues=torch.from_numpy(theta[sel].copy()),
        eigenvectors=vectors,
        residuals=torch.from_numpy(resid[sel].copy()),
        converged=converged,
        num_matvecs=m,
    )


# --------------------------------------------------------------------------------------------
# Trace estimation
# --------------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    r"""A stochastic estimate of :math:`\operatorname{tr} A`.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the per-probe terms over
            :math:`\sqrt{\#\text{probes}}`; for Hutch++ only the stochastic, deflated part varies).
        num_matvecs: products with :math:`A` used.
    """

    value: float
    stderr: float
    num_matvecs: int


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    num_samples: int = 30,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\widehat{\operatorname{tr}} A = \frac1m \sum_{i=1}^m
    z_i^\top A z_i` with Rademacher :math:`z_i \in \{\pm1\}^d` (Hutchinson 1989). Unbiased, with
    variance :math:`\frac2m(\|A\|_F^2 - \sum_i A_{ii}^2)` per the Rademacher distribution.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> est = hutchinson_trace(lambda v: A @ v, 10, num_samples=5, dtype=torch.float64)
        >>> round(est.value, 9)  # diagonal A: z^T A z = tr A for every Rademacher z
        55.0
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    dtype = dtype or torch.get_default_dtype()
    gen = _generator(generator, seed)
    samples = []
    for _ in range(num_samples):
        z = _rademacher(dim, gen, dtype, device)
        samples.append(float(torch.dot(z, matvec(z).reshape(-1).to(dtype))))
    s = torch.tensor(samples, dtype=torch.float64)
    stderr = float(s.std() / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(float(s.mean()), stderr, num_samples)


def hutchpp_trace(
    matvec: Matvec,
    dim: int,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> TraceEstimate:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff, *Hutch++: Optimal Stochastic Trace Estimation*,
    2021): with :math:`s = \lfloor m/3 \rfloor` products each,

    .. math::
        Q = \operatorname{orth}(A S),\qquad
        \widehat{\operatorname{tr}} A = \operatorname{tr}(Q^\top A Q)
        + \frac1s \operatorname{tr}\!\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big),

    :math:`S, G \in \{\pm1\}^{d \times s}`. The top of the spectrum is captured exactly by the
    sketch and Hutchinson only estimates the deflated rest, so the error falls like
    :math:`1/m` instead of :math:`1/\sqrt m` for matrices with decaying spectra (Hessians).
    Memory: about ``3 s d`` numbers (checked against ``max_bytes``).

    With ``num_matvecs >= dim`` the trace is computed exactly instead,
    :math:`\operatorname{tr} A = \sum_{i=1}^d e_i^\top A e_i` with the ``dim`` unit vectors
    (``stderr`` 0, ``num_matvecs`` = ``dim``): at that budget no random sketch can do better,
    and the sketch of ``s > d`` columns would have only ``d`` orthonormal directions.

    Every vector handed to ``matvec`` is contiguous (the sketches are stored one probe per row):
    a strided column of a ``d x s`` matrix made each Hessian-vector product slower (issue 18).

    Example:
        >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.5, 0.1], dtype=torch.float64))
        >>> est = hutchpp_trace(lambda v: A @ v, 5, num_matvecs=15, dtype=torch.float64)
        >>> round(est.value, 6)   # s = 5 = d: the sketch spans everything, exact
        111.6
    """
    s = num_matvecs // 3
    if s < 1:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}")
    dtype = dtype or torch.get_default_dtype()
    if num_matvecs >= dim:  # exact: sum of the diagonal, e_i^T A e_i
        total = 0.0
        for i in range(dim):
            e = torch.zeros(dim, dtype=dtype, device=device)
            e[i] = 1
            total += float(matvec(e).reshape(-1)[i])
        return TraceEstimate(total, 0.0, dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_memory(3 * s * dim * itemsize, max_bytes, f"the Hutch++ sketch (3 x {s} x {dim})",
                 "lower num_matvecs or select fewer parameters")
    gen = _generator(generator, seed)
    # one probe per row (s, d): every vector given to matvec is a contiguous row
    S = torch.stack([_rademacher(dim, gen, dtype, device) for _ in range(s)])
    G = torch.stack([_rademacher(dim, gen, dtype, device) for _ in range(s)])
    AS = torch.stack([matvec(S[i]).reshape(-1).to(dtype) for i in range(s)])  # (s, d)
    Q = torch.linalg.qr(AS.T)[0].T.contiguous()  # (min(s, d), d): orthonormal rows spanning range(AS^T)
    exact = sum(float(torch.dot(Q[i], matvec(Q[i]).reshape(-1).to(dtype))) for i in range(Q.shape[0]))
    G = G - (G @ Q.T) @ Q  # rows of G projected off span(Q): (I - QQ^T) G in row form
    terms = torch.tensor(
        [float(torch.dot(G[i], matvec(G[i]).reshape(-1).to(dtype))) for i in range(s)],
        dtype=torch.float64,
    )
    stderr = float(terms.std() / math.sqrt(s)) if s > 1 else float("nan")
    return TraceEstimate(exact + float(terms.mean()), stderr, 3 * s)


# --------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


@dataclass
class SpectralDensity:
    r"""Gauss quadrature rules from :func:`slq`, one per probe vector.

    For a unit probe :math:`v`, ``num_steps`` Lanczos steps give nodes :math:`\theta_j` (Ritz
    values) and weights :math:`\tau_j = (e_1^\top s_j)^2` with
    :math:`\sum_j \tau_j f(\theta_j) = v^\top f(A) v` exactly for polynomials of degree
    :math:`\le 2\,\text{num\_steps} - 1` (Golub & Meurant). Averaging over random probes estimates
    the spectral density :math:`\phi(t) = \frac1d\sum_i \delta(t - \lambda_i)` (Lin, Saad & Yang
    2016; Ghorbani, Krishnan & Xiao 2019).

    Attributes:
        nodes: ``(num_probes, num_steps)`` Ritz values.
        weights: ``(num_probes, num_steps)`` quadrature weights (each row sums to 1).
        dim: :math:`d`.
        num_matvecs: products with :math:`A` used.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    num_matvecs: int

    def trace(self, f: Callable[[Tensor], Tensor] = lambda t: t) -> float:
        r"""Estimate of :math:`\operatorname{tr} f(A) = d \cdot \mathbb E_v[v^\top f(A) v]`."""
        return float(self.dim * (self.weights * f(self.nodes)).sum(1).mean())

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        r"""Gaussian-smoothed density on ``grid``:
        :math:`\hat\phi_\sigma(t) = \frac{1}{n_v}\sum_{v,j} \tau_{vj}\,
        \mathcal N(t;\theta_{vj},\sigma^2)`, which integrates to 1 (a density over eigenvalues,
        normalized by :math:`d`)."""
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        t = grid.to(torch.float64).reshape(-1, 1, 1)
        gauss = torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (gauss * self.weights).sum(-1).mean(-1)


def slq(
    matvec: Matvec,
    dim: int,
    num_probes: int = 4,
    num_steps: int = 40,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature: ``num_probes`` Lanczos runs of ``num_steps`` steps (full
    reorthogonalization) from normalized Rademacher probes; see :class:`SpectralDensity`.

    Costs ``num_probes * num_steps`` products; memory one basis of ``num_steps + 1`` vectors.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
        >>> sd = slq(lambda v: A @ v, 20, num_probes=2, num_steps=20, dtype=torch.float64)
        >>> round(sd.trace(), 6)  # num_steps = d: exact quadrature; z^T A z = tr A here
        210.0
    """
    if num_probes < 1 or num_steps < 1:
        raise ValueError(f"num_probes and num_steps must be >= 1, got {num_probes}, {num_steps}")
    num_steps = min(num_steps, dim)
    dtype = dtype or torch.get_default_dtype()
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_memory((num_steps + 1) * dim * itemsize, max_bytes,
                 f"the SLQ Lanczos basis ({num_steps + 1} x {dim})",
                 "lower num_steps or select fewer parameters")
    gen = _generator(generator, seed)
    nodes = torch.zeros(num_probes, num_steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, num_steps, dtype=torch.float64)
    used = 0
    for p in range(num_probes):
        v = _rademacher(dim, gen, dtype, device)
        res = _tridiagonal(matvec, v, num_steps, gen)
        used += res[2]
        theta, S = torch.linalg.eigh(res[0])
        nodes[p] = theta
        weights[p] = S[0] ** 2
    return SpectralDensity(nodes, weights, dim, used)


def _tridiagonal(matvec: Matvec, v: Tensor, steps: int, gen: torch.Generator):
    """``steps`` Lanczos steps from ``v`` (full reorthogonalization, restart on breakdown):
    returns (T as float64 ``steps x steps``, basis, products used)."""
    dim = v.numel()
    Q = torch.zeros(steps, dim, dtype=v.dtype, device=v.device)
    Q[0] = v / torch.linalg.vector_norm(v)
    alphas, betas = [], []
    scale = 0.0
    for j in range(steps):
        w = matvec(Q[j]).reshape(-1).to(v.dtype)
        alpha = float(torch.dot(w, Q[j]))
        alphas.append(alpha)
        scale = max(scale, abs(alpha))
        w = w - alpha * Q[j] - (betas[-1] * Q[j - 1] if j > 0 else 0)
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        if j + 1 == steps:
            break
        beta = float(torch.linalg.vector_norm(w))
        if beta <= 1e-10 * max(scale, 1e-300):
            # invariant subspace: the quadrature is already exact for this probe; pad with a
            # decoupled block whose first-component weight is zero
            w = torch.randn(dim, generator=gen, dtype=v.dtype).to(v.device)
            for _ in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            beta_used = 0.0
            w = w / torch.linalg.vector_norm(w)
        else:
            beta_used = beta
            w = w / beta
        Q[j + 1] = w
        betas.append(beta_used)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T, Q, len(alphas)
