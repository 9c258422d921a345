r"""The WeightWatcher convention for the heavy-tail exponent of a weight spectrum.

lmech's own fit (:func:`lmech.probes.weights.power_law_fit`) and WeightWatcher's
(``weightwatcher`` 0.7.7, ``WW_powerlaw.WWFit``, the default ``pl_package="ww"`` of
``WeightWatcher.analyze``) are both the continuous maximum-likelihood power law
:math:`p(\lambda) \propto \lambda^{-\alpha}` above a cutoff :math:`\lambda_\text{min}` chosen
to minimize a Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman 2009), but they choose
the cutoff differently, so on identical eigenvalues they give different exponents (3-17% apart
on the models of issue 18). The differences, read from WeightWatcher's source:

=====================  ==========================================  ==========================================
                       lmech (:func:`power_law_fit`)               WeightWatcher (:func:`power_law_fit_weightwatcher`)
=====================  ==========================================  ==========================================
KS distance            two-sided: :math:`\max_k \max((k+1)/n - P,   one-sided: :math:`\max_k |P(x_{(k)}) - k/n|`
                       P - k/n)` (both sides of each CDF step)     (the left limit of each step only)
candidate cutoffs      distinct sorted values leaving              every sorted value but the largest
                       :math:`\ge` ``min_tail`` (10) points        (tails down to 2 points)
eigenvalues used       :math:`> 10^{-12}\lambda_\text{max}`        :math:`> 10^{-5}` (absolute)
fewer than 20 values   same rule                                   a bias-corrected MLE
                                                                   :math:`1 + (n-1)/\sum\ln(x/x_\text{min})`,
                                                                   tails of :math:`\ge 8`, cutoff minimizing
                                                                   :math:`D - 0.868/\sqrt n`
=====================  ==========================================  ==========================================

Both use :math:`\hat\alpha = 1 + n/\sum_{x_i \ge x_\text{min}} \ln(x_i/x_\text{min})` (above 20
values) and report :math:`(\hat\alpha - 1)/\sqrt n` as the standard error. Where several cutoffs
tie, both keep the first (smallest).

Conv layers: WeightWatcher reads a ``Conv2d`` kernel ``(out, in, kh, kw)`` as ``kh * kw``
matrices ``W[:, :, i, j]`` of shape ``(out, in)`` and fits the pooled eigenvalues of all of
them, after scaling the kernel by :math:`\sqrt{kh\,kw/2}` (its default ``conv2d_norm=True``;
only the absolute threshold sees the scale, :math:`\alpha` is scale-free). lmech's default reads
the kernel as one ``(out, in * kh * kw)`` matrix. :func:`conv_slices` builds WeightWatcher's
matrices; :func:`lmech.probes.weights.weight_spectra` takes ``conv_matrix="slices"`` for them.
(WeightWatcher's ``Conv1d`` handling, a batched SVD over output channels, is not reproduced.)

This is a reimplementation from reading the source, not a copy; the tests check it against
``weightwatcher`` itself on identical eigenvalues and against ``WeightWatcher.analyze`` on a
model, when the package is installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["WW_EVALS_THRESH", "power_law_fit_weightwatcher", "conv_slices", "conv_slice_scale"]

WW_EVALS_THRESH = 1e-5
"""WeightWatcher's absolute eigenvalue threshold (``EVALS_THRESH``): smaller ones are dropped."""

_SMALL_N = 20  # WeightWatcher's SMALL_N_CUTOFF: below it, the small-sample fit
_SMALL_N_MIN_TAIL = 8


def power_law_fit_weightwatcher(eigenvalues, thresh: float = WW_EVALS_THRESH):
    r"""Power-law fit of an eigenvalue spectrum in WeightWatcher's convention (module docstring).

    Returns a :class:`lmech.probes.weights.PowerLawFit` (``ks_distance`` is the one-sided
    distance). Raises ``ValueError`` with fewer than 2 eigenvalues above ``thresh``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.random(2000) ** (-1 / 1.5)          # Pareto, alpha = 2.5
        >>> abs(power_law_fit_weightwatcher(x).alpha - 2.5) < 0.15
        True
    """
    from lmech.probes.weights import PowerLawFit

    data = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    data = data[data > thresh]
    n_all = data.size
    if n_all < 2:
        raise ValueError(f"the WeightWatcher fit needs at least 2 eigenvalues above {thresh}, got {n_all}")
    logs = np.log(data)
    suffix = np.cumsum(logs[::-1])[::-1]  # sum_{j >= i} log x_j
    small = n_all < _SMALL_N
    best = None  # (objective, alpha, xmin, D, n)
    ranks = np.arange(n_all, dtype=np.float64)
    # one errstate around the O(n^2) scan, not two per candidate: entering and leaving them cost
    # about as much as the arithmetic on pooled conv spectra of a few thousand values
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for i in range(n_all - 1):
            n = n_all - i
            s = np.sum(logs[i:]) - n * logs[i]  # sum log(x / xmin) over the tail, summed as WeightWatcher does
            if small:
                if n < _SMALL_N_MIN_TAIL or s <= 1e-12:
                    continue
                alpha = 1.0 + (n - 1.0) / s
                if alpha <= 1.0:
                    continue
            else:
                alpha = 1.0 + n / s if s > 0 else math.inf
            D = 1.0
            if alpha > 1.0:
                fit_cdf = 1.0 - (data[i:] / data[i]) ** (1.0 - alpha)
                D = float(np.max(np.abs(fit_cdf - ranks[:n] / n)))
            objective = D - 0.868 / math.sqrt(n) if small else D
            if best is None or objective < best[0]:
                best = (objective, alpha, float(data[i]), D, n)
    if best is None:  # small sample with no admissible tail: the whole sample, as WeightWatcher
        n = n_all
        s = suffix[0] - n * logs[0]
        if s <= 1e-12:
            return PowerLawFit(1.0, float(data[0]), 1.0, 0.0, n)
        alpha = 1.0 + (n - 1.0) / s
        D = float(np.max(np.abs(1.0 - (data / data[0]) ** (1.0 - alpha) - np.arange(n) / n)))
        best = (None, alpha, float(data[0]), D, n)
    _, alpha, xmin, D, n = best
    return PowerLawFit(float(alpha), xmin, D, float((alpha - 1) / math.sqrt(n)), int(n))


def conv_slices(kernel: Tensor) -> Tensor:
    r"""WeightWatcher's matrices of a convolution kernel ``(out, in, *k)``: the ``prod(k)``
    matrices ``kernel[:, :, i, j, ...]``, each ``(out, in)``, stacked as ``(prod(k), out, in)``
    (float64, detached). Their singular values pooled are what WeightWatcher fits.

    Example:
        >>> conv_slices(torch.zeros(8, 3, 5, 5)).shape
        torch.Size([25, 8, 3])
    """
    if kernel.dim() < 3:
        raise ValueError(f"conv_slices expects a kernel (out, in, *k), got shape {tuple(kernel.shape)}")
    w = kernel.detach().to(torch.float64)
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)


def conv_slice_scale(kernel: Tensor) -> float:
    r"""WeightWatcher's ``conv2d_norm`` factor on the eigenvalues of a 2-D kernel's slices,
    :math:`kh\,kw/2` (the kernel is scaled by its square root); 1 for other kernels. Only the
    absolute threshold :data:`WW_EVALS_THRESH` sees it."""
    if kernel.dim() != 4:
        return 1.0
    return kernel.shape[2] * kernel.shape[3] / 2.0
