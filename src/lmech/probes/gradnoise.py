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
Reductions run in the gradients' dtype per chunk and are accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, per_example_grads
from lmech.core.linalg import MemoryBudgetError
from lmech.probes.base import Cost, TrainState, differentiable_kernels, layer_groups, split_batch, subsample

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


def _noise_scale(trace_cov: Tensor, norm_sq: Tensor, b: int | Tensor) -> Tensor:
    denom = norm_sq - trace_cov / b
    return torch.where(denom > 0, trace_cov / denom.clamp_min(1e-300), torch.full_like(denom, math.inf))


def _jackknife_se(loo: Tensor) -> float:
    """sqrt((b-1)/b * sum_i (theta_{-i} - mean)^2); nan if any leave-one-out value is not finite."""
    if not bool(torch.isfinite(loo).all()):
        return float("nan")
    b = loo.numel()
    return float(((b - 1) / b * ((loo - loo.mean()) ** 2).sum()).sqrt())


def _group_summary(mean: Tensor, m2: Tensor, sq: Tensor, dot: Tensor, b: int) -> GroupNoise:
    """From the per-coordinate mean and centered sum of squares M2 = sum_i (g_i - mean)^2 (flat
    over the group), and per example sq_i = |g_i|^2 and dot_i = S1 . g_i with S1 = b * mean."""
    var = m2 / (b - 1)
    loo = var / b
    norm_sq = (mean**2).sum()
    trace_cov = var.sum()
    snr = norm_sq / (trace_cov / b) if float(trace_cov) > 0 else torch.tensor(math.inf, dtype=mean.dtype)
    has_var = var > 0
    gsnr = (mean[has_var] ** 2 / var[has_var])
    # leave-one-out (jackknife) values of the group statistics, exactly, from the sums:
    # S1_{-i} = S1 - g_i and Q_{-i} = Q - |g_i|^2 with Q = sum_i |g_i|^2
    Q = sq.sum()
    bp = b - 1
    norm_sq_loo = (b * b * norm_sq - 2 * dot + sq) / bp**2
    trace_cov_loo = ((Q - sq) - bp * norm_sq_loo) / (bp - 1) if bp > 1 else torch.full_like(sq, math.nan)
    snr_loo = norm_sq_loo / (trace_cov_loo / bp)
    return GroupNoise(
        grad_norm_sq=float(norm_sq),
        trace_cov=float(trace_cov),
        signal=float(norm_sq - loo.sum()),
        snr=float(snr),
        snr_stderr=_jackknife_se(snr_loo),
        mean_gsnr=float(gsnr.mean()) if gsnr.numel() else float("nan"),
        gate_fraction=float((mean**2 > loo).double().mean()),
        noise_scale=float(_noise_scale(trace_cov, norm_sq, b)),
        noise_scale_stderr=_jackknife_se(_noise_scale(trace_cov_loo, norm_sq_loo, bp)),
        numel=int(mean.numel()),
    )


def _mean_and_m2(G: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and centered sum of squares of ``G`` (rows = examples), as float64.

    Accumulates squares of the rows shifted by the first row (same variance, so the final
    correction ``m (mean - shift)^2`` is of the variance's size: no catastrophic cancellation)
    with one fused multiply-add per row; much faster on CPU than ``Tensor.var(0)``.
    """
    shift = G[0]
    acc = torch.zeros_like(shift)
    for row in G[1:]:
        d = row - shift
        acc.addcmul_(d, d)
    mean = G.mean(0)
    dm = (mean - shift).to(torch.float64)
    m2 = (acc.to(torch.float64) - G.shape[0] * dm * dm).clamp_min(0)
    return mean.to(torch.float64), m2


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
        with differentiable_kernels():  # attention kernels that vmap can batch
            return per_example_grads(fm, loss_fn, xs, ys, chunk_size=chunk_size, max_bytes=None)

    # One pass over chunks of per-example gradients (in their own dtype; per-chunk reductions
    # only, no float64 copy of the b x P gradients): per-coordinate mean and centered sum of
    # squares combined across chunks (Chan, Golub & LeVeque 1979; numerically stable), and each
    # example's squared norm per tensor. A second pass (only when chunked) gives g_i . S1.
    dt = torch.float64
    dev = next(iter(fm.params.values())).device
    mean = {n: torch.zeros(fm.shapes[n], dtype=dt, device=dev) for n in fm.names}
    m2 = {n: torch.zeros(fm.shapes[n], dtype=dt, device=dev) for n in fm.names}
    sq = {n: torch.zeros(b, dtype=dt, device=dev) for n in fm.names}  # |g_i|^2 per tensor
    dot = {n: torch.zeros(b, dtype=dt, device=dev) for n in fm.names}  # S1 . g_i per tensor
    kept = None
    seen = 0
    for a, c in spans:
        g = grads_of(a, c)
        m = c - a
        for n in fm.names:
            gi = g[n].reshape(m, -1)
            chunk_mean, chunk_m2 = _mean_and_m2(gi)
            delta = chunk_mean - mean[n].reshape(-1)
            total = seen + m
            mean[n] += (delta * (m / total)).reshape(fm.shapes[n])
            m2[n] += (chunk_m2 + delta**2 * (seen * m / total)).reshape(fm.shapes[n])
            sq[n][a:c] = torch.linalg.vector_norm(gi, dim=1).to(dt) ** 2
        seen += m
        if len(spans) == 1:
            kept = g
    for a, c in spans:
        g = kept if kept is not None else grads_of(a, c)
        for n in fm.names:
            gi = g[n].reshape(c - a, -1)
            S1 = (b * mean[n]).reshape(-1)
            dot[n][a:c] = (gi @ S1.to(gi.dtype)).to(dt)

    def summary(names: list[str]) -> GroupNoise:
        return _group_summary(
            torch.cat([mean[n].reshape(-1) for n in names]),
            torch.cat([m2[n].reshape(-1) for n in names]),
            sum(sq[n] for n in names),
            sum(dot[n] for n in names),
            b,
        )

    var = {n: m2[n] / (b - 1) for n in fm.names}
    loo = {n: var[n] / b for n in fm.names}
    snr = {n: torch.where(loo[n] > 0, mean[n] ** 2 / loo[n].clamp_min(1e-300),
                          torch.full_like(loo[n], math.nan)) for n in fm.names}
    return GradNoise(
        mean=mean, variance=var, loo_variance=loo, snr=snr,
        groups={label: summary(names) for label, names in groups.items()},
        total=summary(fm.names),
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
