r"""Gradient noise from per-example gradients: signal-to-noise ratios, the exact leave-one-out
noise term, and the gradient noise scale, per coordinate, per layer and globally, with jackknife
standard errors.

On a batch of :math:`b` examples with per-example gradients :math:`g_i = \nabla_w
\ell(f(x_i; w), y_i)` (each a batch of one, :func:`lmech.core.per_example_grads`), per coordinate
:math:`k`:

* mean :math:`\bar g_k = \frac1b\sum_i g_{ik}` (the minibatch gradient for a mean loss);
* per-example variance :math:`\hat\sigma^2_k = \frac1{b-1}\sum_i (g_{ik} - \bar g_k)^2` (unbiased);
* **leave-one-out noise term** :math:`\hat s_k = \hat\sigma_k^2 / b = \Sigma_{B,k}/(b-1)` with
  :math:`\Sigma_{B,k} = \frac1b\sum_i (g_{ik}-\bar g_k)^2`. Exactly, it is the jackknife variance of
  the batch mean, :math:`\frac{b-1}{b}\sum_i(\bar g_{-i,k} - \bar g_k)^2`, and
  :math:`\bar g_k^2 - \hat s_k = \frac1b\sum_i g_{ik}\,\bar g_{-i,k} = \frac{1}{b(b-1)}\sum_{i\ne j}
  g_{ik}g_{jk}` is the unbiased (U-statistic) estimate of the squared true mean
  :math:`\mu_k^2` (``signal``). This is the term the SNR-gated AdamW compares against
  (shared/research/generalization-theory.md §1.6): a coordinate "passes" when
  :math:`\bar g_k^2 > \alpha \hat s_k`;
* **SNR** :math:`\bar g_k^2/\hat s_k` (batch-mean SNR; ``gate_fraction`` is the fraction above
  1, the :math:`\alpha = 1` gate) and **GSNR** :math:`\bar g_k^2/\hat\sigma^2_k = \mathrm{SNR}_k/b`
  (per-example, Liu et al., *Understanding Why Neural Networks Generalize Well Through GSNR of
  Parameters*, ICLR 2020; ``mean_gsnr`` averages it over coordinates as Cockpit's MeanGSNR).

Per group of coordinates (a layer, or all): :math:`|\bar g|^2`, :math:`\operatorname{tr}\hat\Sigma =
\sum_k \hat\sigma_k^2`, the group SNR :math:`|\bar g|^2 / (\operatorname{tr}\hat\Sigma / b)`, and
the **gradient noise scale** :math:`B_\text{simple} = \operatorname{tr}\Sigma / |G|^2` (McCandlish
et al., *An Empirical Model of Large-Batch Training*, 2018) with the unbiased
:math:`\widehat{|G|^2} = |\bar g|^2 - \operatorname{tr}\hat\Sigma/b` in the denominator
(``inf`` when that is :math:`\le 0`: noise dominates at this batch size). Group SNR and noise
scale come with **jackknife standard errors**, computed exactly from the leave-one-out sums
:math:`S_1 - g_i` and :math:`Q - |g_i|^2` without recomputing any gradient.

Memory: per-example gradients take :math:`b P` numbers; above ``max_bytes`` the batch is processed
in chunks of examples (two passes: moments first, then each example's dot product with the sum).
Reductions run in the gradients' dtype per chunk, in place on the freshly computed gradients (no
copy of the :math:`b \times P` matrix), and are combined in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, per_example_grads
from lmech.core.linalg import MemoryBudgetError
from lmech.probes.base import Cost, TrainState, layer_groups, split_batch, subsample

__all__ = ["GroupNoise", "GradNoise", "grad_noise", "GradNoiseProbe"]


@dataclass
class GroupNoise:
    r"""Summary of one group of coordinates (see the module docstring for the formulas).

    Attributes:
        grad_norm_sq: :math:`|\bar g|^2`.
        trace_cov: :math:`\operatorname{tr}\hat\Sigma` (per-example covariance, unbiased).
        signal: :math:`\sum_k (\bar g_k^2 - \hat s_k)`, unbiased estimate of :math:`|\mu|^2`.
        snr: :math:`|\bar g|^2/(\operatorname{tr}\hat\Sigma/b)`; ``snr_stderr`` its jackknife error.
        mean_gsnr: mean over coordinates of :math:`\bar g_k^2/\hat\sigma_k^2` (coordinates with no
            variance are skipped).
        gate_fraction: fraction of coordinates with :math:`\bar g_k^2 > \hat s_k`.
        noise_scale: :math:`\operatorname{tr}\hat\Sigma / (|\bar g|^2 - \operatorname{tr}\hat\Sigma/b)`;
            ``noise_scale_stderr`` its jackknife error (``nan`` when a leave-one-out value is inf).
        numel: coordinates in the group.
    """

    grad_norm_sq: float
    trace_cov: float
    signal: float
    snr: float
    snr_stderr: float
    mean_gsnr: float
    gate_fraction: float
    noise_scale: float
    noise_scale_stderr: float
    numel: int


@dataclass
class GradNoise:
    r"""Result of :func:`grad_noise`.

    Attributes:
        mean, variance, loo_variance, snr: dicts ``name -> tensor shaped like the parameter``:
            :math:`\bar g`, :math:`\hat\sigma^2`, :math:`\hat s = \hat\sigma^2/b`, and
            :math:`\bar g^2/\hat s` (``nan`` where :math:`\hat s = 0`).
        groups: ``label -> GroupNoise`` per layer (:func:`lmech.probes.base.layer_groups`, or the
            groups given).
        total: ``GroupNoise`` over all selected coordinates.
        batch_size: :math:`b`.
    """

    mean: dict[str, Tensor]
    variance: dict[str, Tensor]
    loo_variance: dict[str, Tensor]
    snr: dict[str, Tensor]
    groups: dict[str, GroupNoise]
    total: GroupNoise
    batch_size: int


def _noise_scale(trace_cov: np.ndarray, norm_sq: np.ndarray, b: int) -> np.ndarray:
    denom = norm_sq - trace_cov / b
    return np.where(denom > 0, trace_cov / np.maximum(denom, 1e-300), math.inf)


def _jackknife_se(loo: np.ndarray) -> np.ndarray:
    """Per row of ``loo`` (leave-one-out values, last dim = examples):
    sqrt((b-1)/b * sum_i (theta_{-i} - mean)^2); nan for a row with a non-finite value."""
    b = loo.shape[-1]
    finite = np.isfinite(loo).all(-1)
    x = np.where(finite[..., None], loo, 0.0)
    se = np.sqrt((b - 1) / b * ((x - x.mean(-1, keepdims=True)) ** 2).sum(-1))
    return np.where(finite, se, math.nan)


def _group_summaries(sums: np.ndarray, numel: np.ndarray, sq: np.ndarray, dot: np.ndarray,
                     members: list[list[int]], b: int) -> list[GroupNoise]:
    r"""Statistics of every group at once, from per-tensor sums (float64 NumPy arrays: a few
    dozen operations on arrays of a few numbers, cheaper in NumPy than in torch).

    ``sums`` is ``(T, 6)``: per tensor :math:`\sum_k \bar g_k^2`, :math:`\sum_k \hat\sigma_k^2`,
    :math:`\sum_k \hat s_k`, :math:`\sum_k \mathrm{GSNR}_k` over coordinates with
    :math:`\hat\sigma_k^2 > 0`, the count of those, and the count of :math:`\bar g_k^2 > \hat s_k`;
    ``numel`` ``(T,)``; ``sq`` and ``dot`` ``(T, b)``: :math:`|g_i|^2` and :math:`S_1\cdot g_i`
    restricted to each tensor. ``members[j]`` lists the tensors of group ``j``. Every group
    statistic is a sum over its coordinates, so adding the per-tensor sums is exact.
    """

    def add(x: np.ndarray) -> np.ndarray:  # per-group sums of per-tensor rows
        return np.stack([x[ts].sum(0) for ts in members])

    S, n, sqg, dotg = add(sums), add(numel), add(sq), add(dot)
    norm_sq, trace_cov, loo_sum, gsnr_sum, gsnr_count, gate = S.T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        snr = np.where(trace_cov > 0, norm_sq / (trace_cov / b), math.inf)
        # leave-one-out (jackknife) values of the group statistics, exactly, from the sums:
        # S1_{-i} = S1 - g_i and Q_{-i} = Q - |g_i|^2 with Q = sum_i |g_i|^2 (b >= 3: bp - 1 >= 1)
        Q = sqg.sum(1, keepdims=True)
        bp = b - 1
        norm_sq_loo = (b * b * norm_sq[:, None] - 2 * dotg + sqg) / bp**2
        trace_cov_loo = ((Q - sqg) - bp * norm_sq_loo) / (bp - 1)
        snr_loo = norm_sq_loo / (trace_cov_loo / bp)
        rows = np.stack([
            norm_sq, trace_cov, norm_sq - loo_sum, snr, _jackknife_se(snr_loo),
            np.where(gsnr_count > 0, gsnr_sum / np.maximum(gsnr_count, 1), math.nan),
            gate / n, _noise_scale(trace_cov, norm_sq, b),
            _jackknife_se(_noise_scale(trace_cov_loo, norm_sq_loo, bp)), n,
        ], 1).tolist()
    return [GroupNoise(*r[:9], numel=int(r[9])) for r in rows]


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


def grad_noise(
    model,
    loss_fn: Callable,
    batch,
    params: ParamSelector = None,
    groups: dict[str, list[str]] | None = None,
    *,
    chunk_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> GradNoise:
    r"""Gradient noise statistics of ``loss_fn`` on ``batch`` (module docstring).

    Args:
        model: ``nn.Module`` (run as is: ``eval()`` it for per-example gradients that do not
            depend on the rest of the batch) or :class:`lmech.core.FunctionalModel`.
        loss_fn: the training loss; each example is evaluated as a batch of one.
        batch: ``(inputs, targets)`` with :math:`b \ge 3` examples.
        params: parameter subset.
        groups: ``label -> parameter names`` (default: one group per layer).
        chunk_size: examples per ``vmap`` call inside a chunk.
        max_bytes: budget for the per-example gradients held at once.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> gn = grad_noise(net, nn.functional.mse_loss, (x, y))
        >>> list(gn.mean), list(gn.groups)   # root-level parameters: one group each
        (['weight', 'bias'], ['weight', 'bias'])
        >>> gn.total.snr > 0 and gn.total.noise_scale > 0
        True
    """
    inputs, targets = split_batch(batch)
    b = inputs[0].shape[0]
    if b < 3:
        raise ValueError(f"grad_noise needs at least 3 examples for leave-one-out estimates, got {b}")
    if isinstance(model, FunctionalModel):
        if params is not None:
            raise ValueError("pass `params` only with an nn.Module; a FunctionalModel has its own")
        fm = model
    else:
        fm = FunctionalModel(model, params)
    if groups is None:
        groups = layer_groups(fm.model, fm.names)
    unknown = [n for names in groups.values() for n in names if n not in fm.shapes]
    if unknown:
        raise ValueError(f"groups name unselected parameters {unknown}; selected: {fm.names}")

    item = max(p.element_size() for p in fm.params.values())
    per_example = fm.numel * item
    if max_bytes is None or b * per_example <= max_bytes:
        chunk = b
    else:
        chunk = int(max_bytes // per_example)
        if chunk < 1:
            raise MemoryBudgetError(
                f"one example's gradient needs {per_example / 2**20:.1f} MiB > budget "
                f"{max_bytes / 2**20:.1f} MiB; select fewer parameters (params=), or raise the budget")
    spans = [(s, min(s + chunk, b)) for s in range(0, b, chunk)]

    def grads_of(a, c):
        xs = tuple(x[a:c] for x in inputs)
        ys = None if targets is None else targets[a:c]
        # (per_example_grads runs attention on kernels that vmap can batch by itself)
        return per_example_grads(fm, loss_fn, xs, ys, chunk_size=chunk_size, max_bytes=None)

    # One pass over chunks of per-example gradients, in their own dtype (per-chunk reductions
    # only, no float64 copy of the b x P gradients, overwritten in place): per tensor the column
    # sums and centered sums of squares (_moments), combined across chunks in float64 (Chan,
    # Golub & LeVeque 1979; numerically stable), and each example's squared norm. Unchunked,
    # g_i . S1 comes from the same pass (S1 is the column sum); chunked, a second pass over
    # recomputed gradients gives it. Per-coordinate vectors are kept flat (tensors concatenated
    # in fm.names order), so every statistic below is one operation on all coordinates.
    dt = torch.float64
    names = fm.names
    T = len(names)
    sizes = [math.prod(fm.shapes[n]) for n in names]
    mean = m2 = None
    sq_parts, dot_parts = [], []  # per chunk, (T, m): |g_i|^2 and S1 . g_i per tensor
    seen = 0
    for a, c in spans:
        g = grads_of(a, c)
        m = c - a
        moments = [_moments(g[n].reshape(m, -1), with_dot=len(spans) == 1) for n in names]
        del g
        chunk_mean = torch.cat([r[0] for r in moments]).to(dt) / m
        chunk_m2 = torch.cat([r[1] for r in moments]).to(dt)
        sq_parts.append(torch.stack([r[2] for r in moments]))
        if len(spans) == 1:  # unchunked: S1 is this chunk's column sum
            dot_parts.append(torch.stack([r[3] for r in moments]))
        del moments
        if seen == 0:
            mean, m2 = chunk_mean, chunk_m2
        else:
            delta = chunk_mean - mean
            total = seen + m
            mean = mean + delta * (m / total)
            m2 = m2 + chunk_m2 + delta**2 * (seen * m / total)
        seen += m
    if len(spans) > 1:
        S1 = (b * mean).split(sizes)
        for a, c in spans:
            g = grads_of(a, c)
            dot_parts.append(torch.stack([torch.inner(gi, S1[t].to(gi.dtype))
                                          for t, gi in enumerate(g[n].reshape(c - a, -1) for n in names)]))
    sq = torch.cat(sq_parts, 1).to(dt)
    dot = torch.cat(dot_parts, 1).to(dt)

    # per-coordinate statistics, flat; per-tensor sums; groups add the per-tensor sums
    var = m2 / (b - 1)
    loo = var / b
    msq = mean * mean
    has_var = m2 > 0
    snr = torch.where(has_var, msq / loo, math.nan)  # 0/0 and x/0 are discarded by where
    # rows |gbar_k|^2, sigma_k^2, GSNR_k = SNR_k / b (0 where no variance), has variance, gate:
    # per-tensor sums of all five with one reduction per tensor
    rows = torch.stack([msq, var, torch.where(has_var, msq / var, 0.0), has_var.to(dt), (msq > loo).to(dt)])
    per_t = torch.stack([piece.sum(1) for piece in rows.split(sizes, 1)]).cpu().numpy()
    sums = np.concatenate([per_t[:, :2], per_t[:, 1:2] / b, per_t[:, 2:]], 1)
    index = {n: t for t, n in enumerate(names)}
    labels = list(groups)
    members = [[index[n] for n in groups[label]] for label in labels] + [list(range(T))]
    summaries = _group_summaries(sums, np.array(sizes, dtype=np.float64), sq.cpu().numpy(),
                                 dot.cpu().numpy(), members, b)

    def per_tensor(flat: Tensor) -> dict[str, Tensor]:
        return {n: piece.view(fm.shapes[n]) for n, piece in zip(names, flat.split(sizes))}

    return GradNoise(
        mean=per_tensor(mean), variance=per_tensor(var), loo_variance=per_tensor(loo),
        snr=per_tensor(snr),
        groups=dict(zip(labels, summaries[:-1])),
        total=summaries[-1],
        batch_size=b,
    )


class GradNoiseProbe:
    r"""Monitor probe: :func:`grad_noise` on the probe batch.

    Metrics (global): ``grad_norm``, ``snr``, ``snr_stderr``, ``mean_gsnr``, ``gate_fraction``,
    ``noise_scale``, ``noise_scale_stderr``, ``signal``; per layer (``per_layer=True``):
    ``snr/<layer>``, ``gate_fraction/<layer>``, ``noise_scale/<layer>``; with
    ``per_coordinate=True`` the arrays ``coord_snr/<param>`` (one value per scalar parameter).
    ``num_examples`` uses the first examples of the probe batch only (cost grows with it).
    """

    name = "gradnoise"
    cost: Cost = "medium"

    def __init__(self, *, per_layer: bool = True, per_coordinate: bool = False, num_examples: int | None = None):
        self.per_layer, self.per_coordinate, self.num_examples = per_layer, per_coordinate, num_examples

    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        batch = subsample(state.batch, self.num_examples)
        gn = grad_noise(state.model, state.loss_fn, batch, state.params, max_bytes=state.max_bytes)
        t = gn.total
        out: dict[str, float | Tensor] = {
            "grad_norm": math.sqrt(t.grad_norm_sq), "snr": t.snr, "snr_stderr": t.snr_stderr,
            "mean_gsnr": t.mean_gsnr, "gate_fraction": t.gate_fraction, "noise_scale": t.noise_scale,
            "noise_scale_stderr": t.noise_scale_stderr, "signal": t.signal,
        }
        if self.per_layer:
            for label, g in gn.groups.items():
                out[f"snr/{label}"] = g.snr
                out[f"gate_fraction/{label}"] = g.gate_fraction
                out[f"noise_scale/{label}"] = g.noise_scale
        if self.per_coordinate:
            for name, s in gn.snr.items():
                out[f"coord_snr/{name}"] = s.reshape(-1)
        return out
