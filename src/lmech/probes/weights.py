r"""Weight-matrix spectra per layer: singular values, spectral norm, stable rank, the heavy-tail
power-law exponent of the eigenvalue density, and the change from initialization.

Every selected parameter with at least two dimensions is a matrix :math:`W \in
\mathbb{R}^{m\times n}` (an embedding as ``(vocab, dim)``); vectors (biases, norm scales) are
skipped. **Conv kernels** ``(out, in, *k)``: the norms, stable rank and changes are always those
of the matrix ``(out, in * prod(k))``; the spectrum and the exponents use ``conv_matrix``:
``"flatten"`` (default) that same matrix, ``"slices"`` WeightWatcher's ``prod(k)`` matrices
``W[:, :, i, j]`` of shape ``(out, in)`` with their eigenvalues pooled
(:func:`lmech.probes.weightwatcher_fit.conv_slices`). The two give different exponents: they
are different matrices.

* singular values :math:`\sigma_1 \ge \dots`, float64, as the square roots of the eigenvalues of
  the smaller Gram matrix (:math:`W^\top W` or :math:`WW^\top`) by LAPACK's divide-and-conquer
  symmetric eigensolver (SciPy ``eigh(driver="evd")``), faster than an SVD on CPU. The
  eigenvalues :math:`\sigma_i^2`, which the exponents are fitted to, have absolute errors of about
  :math:`\epsilon\,\sigma_1^2`; singular values below about :math:`10^{-8}\sigma_1` are therefore
  not resolved (an SVD would resolve them; the fits drop eigenvalues that small anyway);
* spectral norm :math:`\|W\|_2 = \sigma_1`; Frobenius norm; **stable rank**
  :math:`\|W\|_F^2/\|W\|_2^2 = \sum_i\sigma_i^2/\sigma_1^2` (Rudelson & Vershynin 2007);
* **power-law exponent** :math:`\alpha` of the tail of the empirical spectral density of
  :math:`W^\top W` (eigenvalues :math:`\lambda_i = \sigma_i^2`), :math:`p(\lambda) \propto
  \lambda^{-\alpha}` for :math:`\lambda \ge \lambda_\text{min}` (Martin & Mahoney, *Implicit
  Self-Regularization in Deep Neural Networks*, JMLR 2021), in two conventions, both reported:
  ``alpha``, lmech's fit :func:`power_law_fit`, the continuous maximum-likelihood estimator with
  :math:`x_\text{min}` chosen to minimize the two-sided Kolmogorov-Smirnov distance over tails of
  at least ``min_tail`` points (Clauset, Shalizi & Newman, *Power-law distributions in empirical
  data*, SIAM Review 2009); and ``alpha_weightwatcher``, WeightWatcher's own choice of the cutoff
  (one-sided KS distance, tails down to 2 points, an absolute eigenvalue threshold;
  :func:`lmech.probes.weightwatcher_fit.power_law_fit_weightwatcher`), which reproduces
  WeightWatcher's "alpha" on the same eigenvalues. On identical eigenvalues the two differ by a
  few to about 20 percent; compare with WeightWatcher's numbers only in its convention. Neither
  is fitted to a layer with fewer than ``min_eigenvalues`` (50) nonzero eigenvalues: with a
  tail of at least 10 points a spectrum of 10-20 values leaves one or a few candidate cutoffs,
  the fit then calls the whole spectrum a power law, and the exponent means nothing. 50 is a
  rule of thumb, not a derived bound (WeightWatcher's source carries the same number in a
  disabled minimum, "10, really 50"); ``alpha_reason`` says why instead. :math:`\alpha` does not
  depend on the scale of :math:`W`. Decision: we implement this estimator rather than call the
  ``powerlaw`` package, because ``powerlaw`` 2.0.0 constrains :math:`\alpha` to :math:`[0, 3]` by default
  (``DEFAULT_PARAMETER_RANGES``), which silently returns 3.0 for heavier-than-cubic tails
  (weight spectra commonly have :math:`\alpha` of 2-6), and it is slow on thousands of
  eigenvalues; tests check our fit against ``powerlaw`` with a widened range when it is
  installed;
* **relative change from a reference** (initialization): :math:`\|W - W_0\|_F/\|W_0\|_F` and the
  spectral version :math:`\|W - W_0\|_2/\|W_0\|_2`, the one that separates lazy from rich
  training at any width (Yang, Simon & Bernstein, *A Spectral Condition for Feature Learning*,
  2023; shared/research/learning-mechanics.md §2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lmech.core.functional import FunctionalModel, ParamSelector
from lmech.core.linalg import lanczos
from lmech.probes.base import Cost, TrainState
from lmech.probes.precision import full_precision
from lmech.probes.weightwatcher_fit import (
    WW_EVALS_THRESH,
    conv_slice_scale,
    conv_slices,
    power_law_fit_weightwatcher,
)

__all__ = ["PowerLawFit", "power_law_fit", "LayerSpectrum", "weight_spectra", "spectral_norm",
           "spectral_norm_and_vector", "WeightSpectrumProbe"]


@dataclass
class PowerLawFit:
    r"""A continuous power-law fit :math:`p(x) = \frac{\alpha-1}{x_\text{min}}
    (x/x_\text{min})^{-\alpha}`, :math:`x \ge x_\text{min}`.

    Attributes:
        alpha: the MLE :math:`\hat\alpha = 1 + n_\text{tail}/\sum_{x_i\ge x_\text{min}}\ln(x_i/x_\text{min})`
            (WeightWatcher's small-sample fit: :math:`n_\text{tail} - 1` in the numerator).
        xmin: the chosen lower cutoff.
        ks_distance: Kolmogorov-Smirnov distance between the tail and the fit (two-sided in
            :func:`power_law_fit`, one-sided in the WeightWatcher convention).
        stderr: :math:`(\hat\alpha - 1)/\sqrt{n_\text{tail}}` (asymptotic standard error).
        n_tail: points at or above ``xmin``.
    """

    alpha: float
    xmin: float
    ks_distance: float
    stderr: float
    n_tail: int


def power_law_fit(x, xmin: float | None = None, min_tail: int = 10) -> PowerLawFit:
    r"""Fit a power-law tail to positive samples ``x`` (Clauset, Shalizi & Newman 2009).

    For every candidate :math:`x_\text{min}` among the sorted samples that leaves at least
    ``min_tail`` points, compute the MLE :math:`\hat\alpha` and the KS distance
    :math:`D = \max_{x \ge x_\text{min}} |S(x) - P(x)|` between the empirical CDF of the tail and
    :math:`P(x) = 1 - (x/x_\text{min})^{1-\hat\alpha}`; keep the candidate with the smallest
    :math:`D`. With ``xmin`` given, fit only that cutoff. Non-positive samples are dropped.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.random(4000) ** (-1 / 1.5)        # Pareto, alpha = 2.5, xmin = 1
        >>> fit = power_law_fit(x)
        >>> abs(fit.alpha - 2.5) < 0.1
        True
    """
    data = np.sort(np.asarray(x, dtype=np.float64).ravel())
    data = data[data > 0]
    n = data.size
    if n < max(min_tail, 2):
        raise ValueError(f"power_law_fit needs at least {max(min_tail, 2)} positive samples, got {n}")
    logs = np.log(data)
    # suffix sums of log x: sum_{i >= j} log x_i
    suffix = np.cumsum(logs[::-1])[::-1]
    if xmin is not None:
        starts = np.array([int(np.searchsorted(data, xmin, side="left"))])
        if n - starts[0] < 2:
            raise ValueError(f"fewer than 2 samples at or above xmin={xmin}")
    else:
        last = n - min_tail
        starts = np.unique(np.searchsorted(data, data[: last + 1], side="left"))
    best = None
    for j in starts:
        m = n - j
        xm = data[j] if xmin is None else float(xmin)
        denom = suffix[j] - m * math.log(xm)
        if denom <= 0:
            continue
        alpha = 1.0 + m / denom
        tail = data[j:]
        cdf = 1.0 - (tail / xm) ** (1.0 - alpha)
        k = np.arange(m)
        ks = float(max(np.max((k + 1) / m - cdf), np.max(cdf - k / m)))
        if best is None or ks < best[2]:
            best = (alpha, xm, ks, m)
    if best is None:
        raise ValueError("no valid xmin: the samples are all equal")
    alpha, xm, ks, m = best
    return PowerLawFit(float(alpha), float(xm), ks, float((alpha - 1) / math.sqrt(m)), int(m))


@dataclass
class LayerSpectrum:
    r"""Spectral readouts of one weight matrix (module docstring).

    Attributes:
        shape: the matrix shape ``(m, n)`` of the norms (a conv kernel as ``(out, in * prod(k))``).
        singular_values: descending, float64 (``None`` when not computed); of the
            ``conv_matrix`` convention's matrices for a conv kernel (``"slices"``: all slices'
            singular values pooled).
        spectral_norm, frobenius_norm, stable_rank: as named.
        alpha: lmech's :class:`PowerLawFit` (:func:`power_law_fit`) of the eigenvalues
            :math:`\sigma_i^2`, or ``None`` (not requested, or see ``alpha_reason``).
        rel_change_fro, rel_change_op: change from the reference, or ``None`` without one.
        alpha_weightwatcher: the WeightWatcher-convention fit of the same eigenvalues
            (:func:`lmech.probes.weightwatcher_fit.power_law_fit_weightwatcher`), or ``None``.
        alpha_reason: why an exponent requested was not fitted (too few eigenvalues), else ``None``.
        matrix: the convention the spectrum was taken in: ``"matrix"``, ``"flatten"`` or
            ``"slices"`` (the last two for conv kernels).
    """

    shape: tuple[int, int]
    singular_values: Tensor | None
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    alpha: PowerLawFit | None
    rel_change_fro: float | None
    rel_change_op: float | None
    alpha_weightwatcher: PowerLawFit | None = None
    alpha_reason: str | None = None
    matrix: str = "matrix"


def _as_matrix(w: Tensor) -> Tensor:
    return w.detach().reshape(w.shape[0], -1).to(torch.float64)


def weight_spectra(
    model: nn.Module,
    params: ParamSelector = None,
    reference: dict[str, Tensor] | None = None,
    *,
    fit_power_law: bool = True,
    singular_values: bool = True,
    min_tail: int = 10,
    min_eigenvalues: int = 50,
    conventions: tuple[str, ...] = ("lmech", "weightwatcher"),
    conv_matrix: str = "flatten",
    start_vectors: dict[str, Tensor] | None = None,
    tol: float = 1e-5,
) -> dict[str, LayerSpectrum]:
    r"""Spectral readouts of every selected matrix parameter, keyed by parameter name.

    Args:
        model: the module (read only).
        params: parameter subset (default: all trainable floating-point parameters; tied
            matrices appear once).
        reference: ``name -> tensor`` (e.g. ``{n: p.detach().clone() for n, p in
            model.named_parameters()}`` at initialization) for the relative changes.
        fit_power_law: fit :math:`\alpha`.
        min_tail: smallest tail of lmech's fit.
        min_eigenvalues: fewest nonzero eigenvalues for any fit (module docstring); below it
            ``alpha`` and ``alpha_weightwatcher`` are ``None`` and ``alpha_reason`` says why.
        conventions: which exponents to fit: ``"lmech"`` (``alpha``), ``"weightwatcher"``
            (``alpha_weightwatcher``), or both (default).
        conv_matrix: ``"flatten"`` (``(out, in * prod(k))``, default) or ``"slices"``
            (WeightWatcher's per-position ``(out, in)`` matrices) for conv kernels' spectra.
        singular_values: compute the full spectrum (an SVD per matrix). ``False`` computes only
            what needs no spectrum, spectral norms by :func:`spectral_norm` (Lanczos), which for
            a 1024 x 1024 matrix is tens of products instead of an SVD; ``singular_values`` and
            ``alpha`` are then ``None``.
        start_vectors: warm starts for those Lanczos spectral norms
            (:func:`spectral_norm_and_vector`), ``name -> vector``; updated in place with the
            new singular vectors, so passing the same dict at every call continues the
            iteration (same certified tolerance, fewer products).
        tol: relative residual of those Lanczos runs (:func:`spectral_norm`; :math:`\sigma_1` is
            accurate to about ``tol / 2``).

    Example:
        >>> net = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 3))
        >>> init = {n: p.detach().clone() for n, p in net.named_parameters()}
        >>> spec = weight_spectra(net, reference=init)
        >>> list(spec), spec["0.weight"].rel_change_op
        (['0.weight', '2.weight'], 0.0)
        >>> spec["2.weight"].alpha is None      # 3 eigenvalues: too few for a tail fit
        True
    """
    if fit_power_law and not singular_values:
        raise ValueError("fit_power_law needs the singular values: pass singular_values=True")
    if conv_matrix not in ("flatten", "slices"):
        raise ValueError(f"conv_matrix must be 'flatten' or 'slices', got {conv_matrix!r}")
    unknown = set(conventions) - {"lmech", "weightwatcher"}
    if unknown or not conventions:
        raise ValueError(f"conventions must name 'lmech' and/or 'weightwatcher', got {conventions!r}")
    if min_eigenvalues < max(min_tail, 2):
        raise ValueError(f"min_eigenvalues={min_eigenvalues} must be at least min_tail={min_tail} (and 2)")
    fm = FunctionalModel(model, params)
    out: dict[str, LayerSpectrum] = {}
    for name in fm.names:
        p = fm.params[name]
        if p.dim() < 2:
            continue
        W = _as_matrix(p)
        fro = float(torch.linalg.matrix_norm(W))
        sv = alpha = alpha_ww = reason = None
        is_conv = p.dim() >= 3 and isinstance(_owner(model, name), nn.modules.conv._ConvNd)
        matrix = conv_matrix if is_conv else "matrix"
        if singular_values:
            if matrix == "slices":
                sv = torch.cat([_gram_singular_values(m) for m in conv_slices(p)]).sort(descending=True).values
                s1 = spectral_norm(W, tol=tol)  # of the (out, in * prod(k)) matrix, without an SVD
            else:
                sv = _gram_singular_values(W)
                s1 = float(sv[0])
            eig = (sv**2).cpu().numpy()
            eig = eig[eig > 1e-12 * max(float(eig[0]), 1e-300)]
            if fit_power_law and eig.size < min_eigenvalues:
                reason = (f"{eig.size} nonzero eigenvalues < min_eigenvalues={min_eigenvalues}: "
                          "too few for a power-law fit")
            elif fit_power_law:
                if "lmech" in conventions:
                    alpha = power_law_fit(eig, min_tail=min_tail)
                if "weightwatcher" in conventions:
                    # WeightWatcher's threshold is on eigenvalues of the kernel scaled by
                    # sqrt(kh kw / 2) (its conv2d_norm) in the slices convention
                    scale = conv_slice_scale(p) if matrix == "slices" else 1.0
                    n_ww = int((eig * scale > WW_EVALS_THRESH).sum())
                    if n_ww < min_eigenvalues:
                        reason = (f"{n_ww} eigenvalues above WeightWatcher's threshold "
                                  f"{WW_EVALS_THRESH:g} < min_eigenvalues={min_eigenvalues}: no "
                                  "WeightWatcher-convention fit")
                    else:
                        alpha_ww = power_law_fit_weightwatcher(eig * scale)
                        alpha_ww.xmin /= scale
        else:
            s1, vec = spectral_norm_and_vector(W, None if start_vectors is None else start_vectors.get(name),
                                               tol=tol)
            if start_vectors is not None and vec is not None:
                start_vectors[name] = vec
        rel_fro = rel_op = None
        if reference is not None and name in reference:
            W0 = _as_matrix(reference[name])
            if W0.shape != W.shape:
                raise ValueError(f"reference[{name!r}] has shape {tuple(reference[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            D = W - W0
            n0f, n0o = float(torch.linalg.matrix_norm(W0)), spectral_norm(W0, tol=tol)
            rel_fro = float(torch.linalg.matrix_norm(D)) / n0f if n0f > 0 else math.inf
            rel_op = spectral_norm(D, tol=tol) / n0o if n0o > 0 else math.inf
        out[name] = LayerSpectrum(
            shape=tuple(W.shape), singular_values=sv, spectral_norm=s1, frobenius_norm=fro,
            stable_rank=fro**2 / s1**2 if s1 > 0 else 0.0, alpha=alpha,
            rel_change_fro=rel_fro, rel_change_op=rel_op, alpha_weightwatcher=alpha_ww,
            alpha_reason=reason, matrix=matrix,
        )
    return out


def _gram_singular_values(M: Tensor) -> Tensor:
    """Descending singular values of a float64 matrix from its smaller Gram matrix (module
    docstring): ``min(m, n)`` values, eigenvalues clipped at 0 before the square root."""
    from scipy.linalg import eigh

    from lmech.core.threads import blas_threads

    G = (M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T).numpy()
    # SciPy's BLAS held to torch's thread count: on a busy machine its own pool made these
    # eigensolves many times slower (docs/results/probes.md, "At scale")
    with blas_threads():
        lam = eigh(G, eigvals_only=True, driver="evd", overwrite_a=True, check_finite=False)
    return torch.from_numpy(np.sqrt(np.clip(lam[::-1], 0.0, None)).copy())


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    """The module that holds parameter ``name`` (``None`` if not found)."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def spectral_norm(W: Tensor, exact_below: int = 64, tol: float = 1e-5) -> float:
    r""":math:`\|W\|_2 = \sigma_1(W)` of a matrix.

    Exact when the smaller side is at most ``exact_below`` (:math:`\sqrt{\lambda_1}` of the
    smaller Gram matrix by a dense symmetric eigensolver: :math:`\lambda_1` has absolute error
    :math:`O(\epsilon\,\sigma_1^2)`, so :math:`\sigma_1` is accurate to machine precision, and
    it is about twice as fast as ``svdvals``); otherwise
    :math:`\sqrt{\lambda_1(G)}` with :math:`G = W^\top W` or :math:`W W^\top` (the smaller),
    by Lanczos on the products :math:`v \mapsto W^\top(Wv)` (:func:`lmech.core.lanczos`, fixed
    seed, relative residual ``tol``, so :math:`\sigma_1` is accurate to about ``tol / 2``):
    tens of matrix-vector products instead of a full SVD. :func:`spectral_norm_and_vector` also
    returns the singular vector and takes a warm start.

    Example:
        >>> W = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> round(spectral_norm(W), 6)
        100.0
    """
    return spectral_norm_and_vector(W, exact_below=exact_below, tol=tol)[0]


def spectral_norm_and_vector(W: Tensor, v0: Tensor | None = None, *, exact_below: int = 64,
                             tol: float = 1e-5) -> tuple[float, Tensor | None]:
    r""":func:`spectral_norm` with a warm start: returns ``(sigma_1, v)``, ``v`` the unit top
    eigenvector of the Gram matrix Lanczos ran on (:math:`W^\top W` or :math:`WW^\top`, the
    smaller side; ``None`` on the exact path), and starts Lanczos from ``v0`` when it is given
    with the right length (a previous ``v``; otherwise a fixed-seed random vector). The stopping
    rule is the same residual certificate either way, so a warm start changes the number of
    products, not the accuracy: when the matrix moved little since ``v0`` was computed, a few
    products instead of tens.

    Example:
        >>> W = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> s, v = spectral_norm_and_vector(W)
        >>> s2, _ = spectral_norm_and_vector(W * 1.01, v)     # warm start
        >>> round(s, 6), round(s2, 6)
        (100.0, 101.0)
    """
    M = W.detach().to(torch.float64)
    if M.dim() != 2:
        raise ValueError(f"spectral_norm expects a matrix, got shape {tuple(W.shape)}")
    if min(M.shape) <= exact_below:
        G = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T  # the smaller Gram matrix
        return math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0)), None
    if not bool(M.any()):  # the zero matrix (e.g. W - W_ref at the reference): no Krylov space
        return 0.0, None
    if M.shape[0] < M.shape[1]:
        M = M.T  # now tall: the Gram matrix M^T M is the small side
    n = M.shape[1]
    if v0 is not None:
        v0 = v0.detach().reshape(-1).to(torch.float64)
        if v0.numel() != n or not bool(torch.isfinite(v0).all()) or float(v0.abs().max()) == 0.0:
            v0 = None
    res = lanczos(lambda v: M.T @ (M @ v), n, tol=tol, dtype=torch.float64, v0=v0, max_bytes=None)
    return math.sqrt(max(float(res.eigenvalues[0]), 0.0)), res.eigenvectors[:, 0]


class WeightSpectrumProbe:
    r"""Monitor probe: :func:`weight_spectra` of every matrix parameter.

    Metrics per matrix ``<p>``: ``spectral_norm/<p>``, ``stable_rank/<p>``, ``alpha/<p>`` (lmech's
    fit) and ``alpha_ww/<p>`` (WeightWatcher's convention; both when fitted: layers with fewer
    than ``min_eigenvalues`` eigenvalues get none), ``rel_change_op/<p>`` and
    ``rel_change_fro/<p>`` (against the weights at the first
    measurement, or ``reference``), ``singular_values/<p>`` (array, when
    ``singular_values=True``); global: ``alpha_mean`` and ``alpha_ww_mean`` (over the fitted
    layers; ``nan`` when no layer was), ``stable_rank_mean``,
    ``max_spectral_norm``, ``rel_change_fro`` (all matrices together). Keeps one copy of the
    matrices as the reference. Without ``fit_power_law`` and ``singular_values`` no SVD is taken
    (spectral norms by Lanczos, :func:`spectral_norm`); the Lanczos runs for :math:`W` and for
    :math:`W - W_\text{ref}` are warm-started from the previous measurement's singular vectors
    (:func:`spectral_norm_and_vector`; same certified tolerance, fewer products). ``tol`` is
    the relative residual of those runs (:math:`\sigma_1` to about ``tol / 2``).
    """

    name = "weights"
    cost: Cost = "low"
    shards = True  # reads only the weights, which data parallelism keeps equal on every rank

    def __init__(self, *, fit_power_law: bool = True, singular_values: bool = False,
                 reference: dict[str, Tensor] | None = None, tol: float = 1e-5,
                 min_eigenvalues: int = 50, conventions: tuple[str, ...] = ("lmech", "weightwatcher"),
                 conv_matrix: str = "flatten"):
        self.fit_power_law, self.singular_values, self.tol = fit_power_law, singular_values, tol
        self.min_eigenvalues, self.conventions, self.conv_matrix = min_eigenvalues, conventions, conv_matrix
        self.reference = None if reference is None else {n: t.detach().clone() for n, t in reference.items()}
        self._ref_norms: dict[str, tuple[float, float]] | None = None
        self._start: dict[str, Tensor] = {}  # warm starts of the Lanczos spectral norms of W
        self._start_delta: dict[str, Tensor] = {}  # ... and of W - W_ref

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        if self.reference is None:
            fm = FunctionalModel(state.model, state.params)
            self.reference = {n: p.detach().clone() for n, p in fm.params.items() if p.dim() >= 2}
        if self._ref_norms is None:  # reference norms once, not at every measurement
            self._ref_norms = {}
            for n, w in self.reference.items():
                op, vec = spectral_norm_and_vector(_as_matrix(w), tol=self.tol)
                self._ref_norms[n] = (float(torch.linalg.matrix_norm(_as_matrix(w))), op)
                if vec is not None and n not in self._start:  # W starts near W_ref: warm start
                    self._start[n] = vec
        spec = weight_spectra(state.model, state.params, fit_power_law=self.fit_power_law,
                              singular_values=self.fit_power_law or self.singular_values,
                              start_vectors=self._start, tol=self.tol,
                              min_eigenvalues=self.min_eigenvalues, conventions=self.conventions,
                              conv_matrix=self.conv_matrix)
        out: dict[str, float | Tensor] = {}
        alphas, alphas_ww, ranks, num, den = [], [], [], 0.0, 0.0
        for name, s in spec.items():
            out[f"spectral_norm/{name}"] = s.spectral_norm
            out[f"stable_rank/{name}"] = s.stable_rank
            ranks.append(s.stable_rank)
            if s.alpha is not None:
                out[f"alpha/{name}"] = s.alpha.alpha
                alphas.append(s.alpha.alpha)
            if s.alpha_weightwatcher is not None:
                out[f"alpha_ww/{name}"] = s.alpha_weightwatcher.alpha
                alphas_ww.append(s.alpha_weightwatcher.alpha)
            if name in self.reference:
                D = _as_matrix(state.model.get_parameter(name)) - _as_matrix(self.reference[name])
                ref_fro, ref_op = self._ref_norms[name]
                d_fro = float(torch.linalg.matrix_norm(D))
                out[f"rel_change_fro/{name}"] = d_fro / ref_fro if ref_fro > 0 else math.inf
                d_op, vec = spectral_norm_and_vector(D, self._start_delta.get(name), tol=self.tol)
                if vec is not None:
                    self._start_delta[name] = vec
                out[f"rel_change_op/{name}"] = d_op / ref_op if ref_op > 0 else math.inf
                num += d_fro**2
                den += ref_fro**2
            if self.singular_values and s.singular_values is not None:
                out[f"singular_values/{name}"] = s.singular_values
        if self.fit_power_law:
            if "lmech" in self.conventions:
                out["alpha_mean"] = float(np.mean(alphas)) if alphas else math.nan
            if "weightwatcher" in self.conventions:
                out["alpha_ww_mean"] = float(np.mean(alphas_ww)) if alphas_ww else math.nan
        if ranks:
            out["stable_rank_mean"] = float(np.mean(ranks))
            out["max_spectral_norm"] = max(s.spectral_norm for s in spec.values())
        if den > 0:
            out["rel_change_fro"] = math.sqrt(num / den)
        return out
