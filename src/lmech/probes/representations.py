r"""Representation similarity with a chance baseline: linear CKA (biased and debiased), SVCCA and
mutual k-nearest-neighbour alignment, each with a permutation-null p-value.

Representations are matrices :math:`X \in \mathbb{R}^{n \times p_1}`, :math:`Y \in
\mathbb{R}^{n \times p_2}` whose rows are the same :math:`n` inputs (a layer's activations,
flattened per example). Notation follows shared/research/learning-mechanics.md §5.2.

* **Linear CKA** (Kornblith, Norouzi, Lee & Hinton, ICML 2019):
  :math:`\mathrm{CKA}(K, L) = \mathrm{HSIC}(K, L)/\sqrt{\mathrm{HSIC}(K,K)\,\mathrm{HSIC}(L,L)}` with
  :math:`K = XX^\top`, :math:`L = YY^\top`. Biased: :math:`\mathrm{HSIC} = \operatorname{tr}(KHLH)
  /(n-1)^2`, :math:`H = I - \frac1n 11^\top`; it tends to 1 for *unrelated* representations when
  :math:`p \gg n`. **Debiased** (``debiased=True``): the unbiased HSIC of Song et al. (2012),
  :math:`\frac{1}{n(n-3)}\big[\operatorname{tr}(\tilde K\tilde L) + \frac{1^\top\tilde K 1\,
  1^\top\tilde L 1}{(n-1)(n-2)} - \frac{2}{n-2} 1^\top \tilde K\tilde L 1\big]` with zeroed
  diagonals (Murphy, Zylberberg & Fyshe 2024); near 0 for independent representations at any
  :math:`p/n`, and can be slightly negative. Both are invariant to orthogonal transforms and
  isotropic scaling of either representation.
* **SVCCA** (Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017): center, keep the top
  singular directions of each representation that explain ``keep`` of its variance (or a fixed
  number), then the mean canonical correlation of the two reduced representations (the singular
  values of :math:`Q_X^\top Q_Y` for orthonormal bases). With :math:`p \ge n` plain CCA is
  trivially 1; the truncation is what makes it meaningful, and the result depends on it.
* **Mutual k-NN alignment** (Huh, Cheung, Wang & Isola, *The Platonic Representation
  Hypothesis*, ICML 2024): rows L2-normalized, :math:`N_X(i)` the :math:`k` nearest neighbours of
  :math:`i` by inner product (itself excluded), :math:`m = \frac1n\sum_i |N_X(i) \cap N_Y(i)|/k`;
  chance level about :math:`k/(n-1)`.
* **Permutation null** (Gröger, Wen & Brbić 2026): scores :math:`s(X, Y_\pi)` for random row
  permutations :math:`\pi` break the pairing; p-value :math:`(1 + \#\{s_\pi \ge s\})/(K + 1)`,
  and the calibrated score :math:`\mathrm{clip}((s - \tau)/(1 - \tau), 0, 1)` with :math:`\tau` the
  :math:`\lceil 0.95 (K+1)\rceil`-th order statistic of :math:`\{s\} \cup \{s_\pi\}`. Permutations
  act on precomputed Gram matrices, bases or neighbour lists, so each costs :math:`O(n^2)` or
  less, not a recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmech.core.batch import adapt_inputs, split_batch
from lmech.probes.base import Cost, TrainState
from lmech.probes.precision import full_precision

__all__ = [
    "linear_cka",
    "svcca",
    "mutual_knn",
    "SimilarityResult",
    "similarity",
    "layer_features",
    "RepresentationProbe",
]

Metric = Literal["cka", "cka_debiased", "svcca", "mutual_knn"]


def _matrix(X, name: str = "X") -> Tensor:
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X)
    X = X.detach().to(device="cpu", dtype=torch.float64)   # n x features, small: float64 on the CPU
    if X.dim() < 2:
        raise ValueError(f"{name} must have shape (n, features...), got {tuple(X.shape)}")
    X = X.reshape(X.shape[0], -1)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def _pair(X, Y) -> tuple[Tensor, Tensor]:
    X, Y = _matrix(X, "X"), _matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same rows (inputs): {X.shape[0]} vs {Y.shape[0]}")
    return X, Y


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def _center_gram(K: Tensor) -> Tensor:
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def _hsic_biased(Kc: Tensor, Lc: Tensor) -> Tensor:
    """tr(K H L H) with both already centered; the (n-1)^2 cancels in CKA."""
    return (Kc * Lc).sum()


def _zero_diag(K: Tensor) -> Tensor:
    return K - torch.diag(torch.diagonal(K))


def _hsic_unbiased(Kt: Tensor, Lt: Tensor) -> Tensor:
    """Song et al. (2012) unbiased HSIC of zero-diagonal Gram matrices."""
    n = Kt.shape[0]
    term1 = (Kt * Lt).sum()
    term2 = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (Kt.sum(0) @ Lt.sum(1))
    return (term1 + term2 - term3) / (n * (n - 3))


def _cka_from_grams(K: Tensor, L: Tensor, debiased: bool) -> float:
    if debiased:
        Kt, Lt = _zero_diag(K), _zero_diag(L)
        kl, kk, ll = _hsic_unbiased(Kt, Lt), _hsic_unbiased(Kt, Kt), _hsic_unbiased(Lt, Lt)
    else:
        Kc, Lc = _center_gram(K), _center_gram(L)
        kl, kk, ll = _hsic_biased(Kc, Lc), _hsic_biased(Kc, Kc), _hsic_biased(Lc, Lc)
    denom = float(kk) * float(ll)
    if denom <= 0:
        return float("nan")  # a constant representation has no similarity to speak of
    return float(kl) / math.sqrt(denom)


def linear_cka(X, Y, debiased: bool = False) -> float:
    r"""Linear CKA between representations ``X`` ``(n, p1)`` and ``Y`` ``(n, p2)`` (module
    docstring). ``debiased`` needs :math:`n \ge 4`. ``nan`` if either representation is constant.

    Example:
        >>> X = torch.randn(50, 8)
        >>> Q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> round(linear_cka(X, 3 * X @ Q), 6)   # orthogonal map and scaling: same representation
        1.0
    """
    X, Y = _pair(X, Y)
    if debiased and X.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 examples")
    return _cka_from_grams(X @ X.T, Y @ Y.T, debiased)


# --------------------------------------------------------------------------------------------
# SVCCA
# --------------------------------------------------------------------------------------------


def _reduced_basis(X: Tensor, keep: float | int) -> Tensor:
    """Orthonormal basis (n, d) of the top singular directions of centered X."""
    Xc = X - X.mean(0, keepdim=True)
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    tiny = S > S.max() * 1e-10 if S.numel() and float(S.max()) > 0 else torch.zeros_like(S, dtype=torch.bool)
    U, S = U[:, tiny], S[tiny]
    if S.numel() == 0:
        raise ValueError("a representation is constant over the inputs: SVCCA is undefined")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
        frac = torch.cumsum(S**2, 0) / (S**2).sum()
        d = int(torch.searchsorted(frac, torch.tensor(keep, dtype=frac.dtype) - 1e-12)) + 1
    else:
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
        d = keep
    return U[:, : min(d, S.numel())]


def svcca(X, Y, keep: float | int = 0.99) -> float:
    r"""SVCCA: mean canonical correlation after keeping the top directions of each representation
    (a variance fraction as a float, or a count as an int; Raghu et al. keep 99%).

    Example:
        >>> X = torch.randn(200, 6)
        >>> round(svcca(X, X @ torch.randn(6, 6)), 6)   # an invertible linear map: same span
        1.0
    """
    X, Y = _pair(X, Y)
    Qx, Qy = _reduced_basis(X, keep), _reduced_basis(Y, keep)
    return float(torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0).mean())


# --------------------------------------------------------------------------------------------
# Mutual k-NN
# --------------------------------------------------------------------------------------------


def _knn(X: Tensor, k: int) -> Tensor:
    Xn = X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    S = Xn @ Xn.T
    S.fill_diagonal_(-math.inf)
    return torch.topk(S, k, dim=1).indices  # (n, k)


def _knn_overlap(member_x: Tensor, nbr_y: Tensor, k: int) -> float:
    """mean_i |N_X(i) ∩ N_Y(i)| / k with N_X as a boolean membership matrix."""
    return float(member_x.gather(1, nbr_y).sum()) / (k * nbr_y.shape[0])


def _membership(nbr: Tensor, n: int) -> Tensor:
    M = torch.zeros(n, n, dtype=torch.int64)
    M.scatter_(1, nbr, 1)
    return M


def mutual_knn(X, Y, k: int = 10) -> float:
    r"""Mutual k-NN alignment :math:`\frac1n\sum_i |N_X(i)\cap N_Y(i)|/k` (cosine neighbours, self
    excluded); chance is about :math:`k/(n-1)`.

    Example:
        >>> X = torch.randn(100, 5)
        >>> mutual_knn(X, 2 * X, k=5)
        1.0
    """
    X, Y = _pair(X, Y)
    n = X.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n-1] = [1, {n - 1}], got {k}")
    return _knn_overlap(_membership(_knn(X, k), n), _knn(Y, k), k)


# --------------------------------------------------------------------------------------------
# Permutation null
# --------------------------------------------------------------------------------------------


@dataclass
class SimilarityResult:
    r"""A similarity score read against its permutation null.

    Attributes:
        metric: the metric's name.
        score: :math:`s(X, Y)`.
        p_value: :math:`(1 + \#\{s_\pi \ge s\})/(K+1)`; ``nan`` without permutations.
        null_mean, null_std: of the :math:`K` permuted scores.
        calibrated: :math:`\mathrm{clip}((s-\tau)/(1-\tau), 0, 1)` (0: indistinguishable from
            chance at the 5% level).
        null: the permuted scores, ``(K,)``.
    """

    metric: str
    score: float
    p_value: float
    null_mean: float
    null_std: float
    calibrated: float
    null: Tensor


def _scorer(X: Tensor, Y: Tensor, metric: str, k: int, keep) -> Callable[[Tensor | None], float]:
    """Precompute what a permutation of Y's rows acts on; return perm -> score."""
    n = X.shape[0]
    if metric in ("cka", "cka_debiased"):
        debiased = metric == "cka_debiased"
        if debiased and n < 4:
            raise ValueError("debiased CKA needs at least 4 examples")
        K, L = X @ X.T, Y @ Y.T
        if debiased:
            Kt, Lt = _zero_diag(K), _zero_diag(L)
            kk, ll = float(_hsic_unbiased(Kt, Kt)), float(_hsic_unbiased(Lt, Lt))
            norm = math.sqrt(kk * ll) if kk * ll > 0 else float("nan")

            def score(p):
                Lp = Lt if p is None else Lt[p][:, p]
                return float(_hsic_unbiased(Kt, Lp)) / norm
        else:
            Kc, Lc = _center_gram(K), _center_gram(L)
            kk, ll = float((Kc * Kc).sum()), float((Lc * Lc).sum())
            norm = math.sqrt(kk * ll) if kk * ll > 0 else float("nan")

            def score(p):
                Lp = Lc if p is None else Lc[p][:, p]
                return float((Kc * Lp).sum()) / norm
        return score
    if metric == "svcca":
        Qx, Qy = _reduced_basis(X, keep), _reduced_basis(Y, keep)

        def score(p):
            Q = Qy if p is None else Qy[p]
            return float(torch.linalg.svdvals(Qx.T @ Q).clamp(max=1.0).mean())
        return score
    if metric == "mutual_knn":
        if not 1 <= k < n:
            raise ValueError(f"k must be in [1, n-1] = [1, {n - 1}], got {k}")
        member_x = _membership(_knn(X, k), n)
        nbr_y = _knn(Y, k)

        def score(p):
            if p is None:
                return _knn_overlap(member_x, nbr_y, k)
            inv = torch.empty_like(p)
            inv[p] = torch.arange(n)
            return _knn_overlap(member_x, inv[nbr_y[p]], k)  # neighbours of Y_pi, in X's indices
        return score
    raise ValueError(f"metric must be one of cka, cka_debiased, svcca, mutual_knn; got {metric!r}")


def similarity(
    X,
    Y,
    metric: Metric = "cka_debiased",
    *,
    permutations: int = 200,
    k: int = 10,
    keep: float | int = 0.99,
    seed: int = 0,
    alpha: float = 0.05,
) -> SimilarityResult:
    r"""``metric(X, Y)`` with a permutation null of ``permutations`` row shuffles of ``Y``
    (own generator from ``seed``; the global RNG is untouched). ``k`` is for ``mutual_knn``,
    ``keep`` for ``svcca``; ``alpha`` sets the calibration threshold :math:`\tau`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(60, 500, generator=g, dtype=torch.float64)
        >>> Y = torch.randn(60, 500, generator=g, dtype=torch.float64)
        >>> biased = similarity(X, Y, "cka", permutations=50)
        >>> biased.score > 0.8, biased.p_value > 0.05   # high-looking, and no better than chance
        (True, True)
    """
    X, Y = _pair(X, Y)
    score = _scorer(X, Y, metric, k, keep)
    s = score(None)
    if permutations < 1:
        nan = float("nan")
        return SimilarityResult(metric, s, nan, nan, nan, nan, torch.empty(0, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    null = torch.tensor([score(torch.randperm(n, generator=gen)) for _ in range(permutations)],
                        dtype=torch.float64)
    p = (1 + int((null >= s).sum())) / (permutations + 1)
    pool = torch.sort(torch.cat([null, torch.tensor([s], dtype=torch.float64)])).values
    tau = float(pool[min(math.ceil((1 - alpha) * (permutations + 1)), permutations + 1) - 1])
    calibrated = min(max((s - tau) / (1 - tau), 0.0), 1.0) if tau < 1 else 0.0
    return SimilarityResult(metric, s, p, float(null.mean()), float(null.std()), calibrated, null)


# --------------------------------------------------------------------------------------------
# Features from a model, and the probe
# --------------------------------------------------------------------------------------------


def layer_features(model: nn.Module, inputs, layers: list[str] | None = None) -> dict[str, Tensor]:
    r"""Outputs of the named submodules on ``inputs``, each flattened to ``(n, -1)``.

    ``layers`` defaults to every module that directly owns parameters (``nn.Linear``,
    ``nn.Conv*``, ``nn.Embedding``, norms, ...), in model order. Forward hooks are registered for
    one forward pass (under ``torch.no_grad``, model run as is: in training mode BatchNorm uses the
    batch statistics, and its running statistics are restored afterwards) and removed. A module that returns
    a tuple contributes its first tensor. By default, a module whose output is not per example
    (first dim not the batch size, e.g. a positional embedding's ``(T, d)`` table, or one applied
    to position ids of shape ``(1, T)``) is left out. ``inputs`` as in :func:`lmech.probes.ntk` (a
    tensor, a tuple or a dict of tensors).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> {n: tuple(h.shape) for n, h in layer_features(net, torch.randn(5, 3)).items()}
        {'0': (5, 4), '2': (5, 2)}
    """
    model, inputs = adapt_inputs(model, inputs)  # dict/nested inputs (lmech.core.batch)
    modules = dict(model.named_modules())
    per_example_only = layers is None
    if layers is None:
        layers = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"unknown module name(s) {unknown}; valid: {[n for n in modules if n]}")
    feats: dict[str, Tensor] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            feats[name] = t.detach().reshape(t.shape[0], -1)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    # a module in training mode may write to its buffers (BatchNorm's running statistics): put
    # them back, so that reading the features leaves the model as it was
    buffers = [(b, b.clone()) for b in model.buffers()] if any(m.training for m in model.modules()) else []
    try:
        xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        with torch.no_grad():
            model(*xs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    n = xs[0].shape[0] if xs and isinstance(xs[0], Tensor) else None
    return {name: feats[name] for name in layers
            if name in feats and not (per_example_only and n is not None and feats[name].shape[0] != n)}


class RepresentationProbe:
    r"""Monitor probe: how each layer's representation of the probe inputs moved since the first
    measurement (a feature-learning / laziness readout, learning-mechanics.md §2.3).

    Metrics per layer ``<l>``: ``cka/<l>`` (linear CKA with the reference features),
    ``cka_debiased/<l>``, ``feature_change/<l>`` (:math:`\|h - h_0\|_F/\|h_0\|_F`), ``knn/<l>``
    (mutual k-NN with the reference); with ``permutations > 0`` also ``cka_debiased_p/<l>``.
    ``layers`` as in :func:`layer_features`; ``num_examples`` caps the inputs used.
    """

    name = "representations"
    cost: Cost = "low"

    def __init__(self, layers: list[str] | None = None, *, num_examples: int = 256, k: int = 10,
                 permutations: int = 0, seed: int = 0):
        self.layers, self.num_examples, self.k = layers, num_examples, k
        self.permutations, self.seed = permutations, seed
        self._ref: dict[str, Tensor] | None = None

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        inputs, _ = split_batch(state.batch)
        n = min(self.num_examples, inputs[0].shape[0])
        feats = layer_features(state.model, tuple(x[:n] for x in inputs), self.layers)
        if self._ref is None:
            self._ref = {name: h.clone() for name, h in feats.items()}
        out: dict[str, float | Tensor] = {}
        for name, h in feats.items():
            h0 = self._ref[name].to(torch.float64)
            h = h.to(torch.float64)
            out[f"cka/{name}"] = linear_cka(h, h0)
            if n >= 4:
                out[f"cka_debiased/{name}"] = linear_cka(h, h0, debiased=True)
            denom = float(h0.norm())
            out[f"feature_change/{name}"] = float((h - h0).norm()) / denom if denom > 0 else math.nan
            if self.k < n:
                out[f"knn/{name}"] = mutual_knn(h, h0, self.k)
            if self.permutations > 0 and n >= 4:
                out[f"cka_debiased_p/{name}"] = similarity(
                    h, h0, "cka_debiased", permutations=self.permutations, seed=self.seed).p_value
        return out
