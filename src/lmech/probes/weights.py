r"""Weight-matrix spectra per layer: singular values, spectral norm, stable rank, the heavy-tail
power-law exponent of the eigenvalue density, and the change from initialization.

Every selected parameter with at least two dimensions is a matrix :math:`W \in
\mathbb{R}^{m\times n}` (a convolution kernel ``(out, in, *k)`` is read as ``(out, in * prod(k))``,
an embedding as ``(vocab, dim)``); vectors (biases, norm scales) are skipped.

* singular values :math:`\sigma_1 \ge \dots` (``torch.linalg.svdvals``, float64);
* spectral norm :math:`\|W\|_2 = \sigma_1`; Frobenius norm; **stable rank**
  :math:`\|W\|_F^2/\|W\|_2^2 = \sum_i\sigma_i^2/\sigma_1^2` (Rudelson & Vershynin 2007);
* **power-law exponent** :math:`\alpha` of the tail of the empirical spectral density of
  :math:`W^\top W` (eigenvalues :math:`\lambda_i = \sigma_i^2`), :math:`p(\lambda) \propto
  \lambda^{-\alpha}` for :math:`\lambda \ge \lambda_\text{min}` (Martin & Mahoney, *Implicit
  Self-Regularization in Deep Neural Networks*, JMLR 2021; the WeightWatcher "alpha"). Fitted by
  :func:`power_law_fit`: the continuous maximum-likelihood estimator with :math:`x_\text{min}`
  chosen to minimize the Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman, *Power-law
  distributions in empirical data*, SIAM Review 2009). :math:`\alpha` does not depend on the scale
  of :math:`W`. Decision: we implement this estimator rather than call the ``powerlaw`` package,
  because ``powerlaw`` 2.0.0 constrains :math:`\alpha` to :math:`[0, 3]` by default
  (``DEFAULT_PARAMETER_RANGES``), which silently returns 3.0 for heavier-than-cubic tails
  (weight spectra commonly have :math:`\alpha` of 2-6), and it took about 4 s on 8,000
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

__all__ = ["PowerLawFit", "power_law_fit", "LayerSpectrum", "weight_spectra", "spectral_norm",
           "spectral_norm_and_vector", "WeightSpectrumProbe"]


@dataclass
class PowerLawFit:
    r"""A continuous power-law fit :math:`p(x) = \frac{\alpha-1}{x_\text{min}}
    (x/x_\text{min})^{-\alpha}`, :math:`x \ge x_\text{min}`.

    Attributes:
        alpha: the MLE :math:`\hat\alpha = 1 + n_\text{tail}/\sum_{x_i\ge x_\text{min}}\ln(x_i/x_\text{min})`.
        xmin: the chosen lower cutoff.
        ks_distance: Kolmogorov-Smirnov distance between the tail and the fit.
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
        shape: the matrix shape ``(m, n)`` used.
        singular_values: descending, float64 (``None`` when not computed).
        spectral_norm, frobenius_norm, stable_rank: as named.
        alpha: :class:`PowerLawFit` of the eigenvalues of :math:`W^\top W`, or ``None`` (not
            requested, or fewer than ``min_tail`` nonzero eigenvalues).
        rel_change_fro, rel_change_op: change from the reference, or ``None`` without one.
    """

    shape: tuple[int, int]
    singular_values: Tensor | None
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    alpha: PowerLawFit | None
    rel_change_fro: float | None
    rel_change_op: float | None


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
        fit_power_law: fit :math:`\alpha` (needs at least ``min_tail`` nonzero eigenvalues).
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
    fm = FunctionalModel(model, params)
    out: dict[str, LayerSpectrum] = {}
    for name in fm.names:
        p = fm.params[name]
        if p.dim() < 2:
            continue
        W = _as_matrix(p)
        fro = float(torch.linalg.matrix_norm(W))
        sv = alpha = None
        if singular_values:
            sv = torch.linalg.svdvals(W)
            s1 = float(sv[0])
            eig = (sv**2).cpu().numpy()
            eig = eig[eig > 1e-12 * max(float(eig[0]), 1e-300)]
            if fit_power_law and eig.size >= min_tail:
                alpha = power_law_fit(eig, min_tail=min_tail)
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
            rel_change_fro=rel_fro, rel_change_op=rel_op,
        )
    return out


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

    Metrics per matrix ``<p>``: ``spectral_norm/<p>``, ``stable_rank/<p>``, ``alpha/<p>`` (when
    fitted), ``rel_change_op/<p>`` and ``rel_change_fro/<p>`` (against the weights at the first
    measurement, or ``reference``), ``singular_values/<p>`` (array, when
    ``singular_values=True``); global: ``alpha_mean``, ``stable_rank_mean``,
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
                 reference: dict[str, Tensor] | None = None, tol: float = 1e-5):
        self.fit_power_law, self.singular_values, self.tol = fit_power_law, singular_values, tol
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
                              start_vectors=self._start, tol=self.tol)
        out: dict[str, float | Tensor] = {}
        alphas, ranks, num, den = [], [], 0.0, 0.0
        for name, s in spec.items():
            out[f"spectral_norm/{name}"] = s.spectral_norm
            out[f"stable_rank/{name}"] = s.stable_rank
            ranks.append(s.stable_rank)
            if s.alpha is not None:
                out[f"alpha/{name}"] = s.alpha.alpha
                alphas.append(s.alpha.alpha)
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
        if alphas:
            out["alpha_mean"] = float(np.mean(alphas))
        if ranks:
            out["stable_rank_mean"] = float(np.mean(ranks))
            out["max_spectral_norm"] = max(s.spectral_norm for s in spec.values())
        if den > 0:
            out["rel_change_fro"] = math.sqrt(num / den)
        return out
