r"""Gradient noise statistics from sufficient statistics: the result types of
:func:`lmech.probes.gradnoise.grad_noise`, the per-tensor sums of the per-coordinate statistics,
and the per-group summaries with their jackknife standard errors (formulas in the docstring of
:mod:`lmech.probes.gradnoise`).

Everything here is a function of the column sums :math:`S_k = \sum_i g_{ik}`, the centered sums of
squares :math:`\sum_i (g_{ik} - \bar g_k)^2` and, for the standard errors, each example's
:math:`|g_i|^2` and :math:`g_i \cdot S` restricted to each tensor: whichever pass computed them
(:mod:`lmech.probes.gradnoise_linear`, :mod:`lmech.probes.gradnoise_vmap`) on however many
processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

__all__ = ["GATE_MARGIN", "GroupNoise", "GradNoise"]

# gate_fraction counts gbar_k^2 > (1 + GATE_MARGIN) * s_k (module docstring: exact ties at SNR 1)
GATE_MARGIN = 1e-4


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
        gate_fraction: fraction of coordinates with :math:`\bar g_k^2 > \hat s_k` (by a
            relative margin :data:`GATE_MARGIN`).
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
            :math:`\bar g^2/\hat s` (``nan`` where :math:`\hat s = 0`); computed on first access
            (the group summaries do not need them).
        groups: ``label -> GroupNoise`` per layer (:func:`lmech.probes.base.layer_groups`, or the
            groups given).
        total: ``GroupNoise`` over all selected coordinates.
        batch_size: :math:`b`.
        method: ``"linear"`` or ``"vmap"``, the path that computed it.
    """

    groups: dict[str, GroupNoise]
    total: GroupNoise
    batch_size: int
    method: str
    flat_sum: Tensor = field(repr=False)  # float64 column sums sum_i g_ik, the selected tensors concatenated
    flat_m2: Tensor = field(repr=False)  # centered sums of squares sum_i (g_ik - gbar_k)^2
    shapes: dict[str, torch.Size] = field(repr=False)

    @cached_property
    def flat_mean(self) -> Tensor:
        return self.flat_sum * (1.0 / self.batch_size)

    def _per_tensor(self, flat: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes.values()]
        return {n: piece.view(s) for (n, s), piece in zip(self.shapes.items(), flat.split(sizes))}

    @cached_property
    def mean(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_mean)

    @cached_property
    def variance(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_m2 * (1.0 / (self.batch_size - 1)))

    @cached_property
    def loo_variance(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_m2 * (1.0 / (self.batch_size * (self.batch_size - 1))))

    @cached_property
    def snr(self) -> dict[str, Tensor]:
        # gbar^2 b (b-1) / m2 = S^2 (b-1) / (b m2); nan where m2 = 0 (inf or 0/0 before)
        b = self.batch_size
        ratio = self.flat_sum.square().mul_((b - 1) / b).div_(self.flat_m2)
        return self._per_tensor(ratio.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan))


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


def _group_summaries(sums: np.ndarray, numel: np.ndarray, sq: np.ndarray | None, dot: np.ndarray | None,
                     members: list[list[int]], b: int) -> list[GroupNoise]:
    r"""Statistics of every group at once, from per-tensor sums (float64 NumPy arrays: a few
    dozen operations on arrays of a few numbers, cheaper in NumPy than in torch).

    ``sums`` is ``(T, 6)``: per tensor :math:`\sum_k \bar g_k^2`, :math:`\sum_k \hat\sigma_k^2`,
    :math:`\sum_k \hat s_k`, :math:`\sum_k \mathrm{GSNR}_k` over coordinates with
    :math:`\hat\sigma_k^2 > 0`, the count of those, and the count of :math:`\bar g_k^2 > \hat s_k`;
    ``numel`` ``(T,)``; ``sq`` and ``dot`` ``(T, b)``: :math:`|g_i|^2` and :math:`S_1\cdot g_i`
    restricted to each tensor (``None``: no standard errors, ``nan``). ``members[j]`` lists the tensors of group ``j``. Every group
    statistic is a sum over its coordinates, so adding the per-tensor sums is exact.
    """

    def add(x: np.ndarray) -> np.ndarray:  # per-group sums of per-tensor rows
        return np.stack([x[ts].sum(0) for ts in members])

    S, n = add(sums), add(numel)
    norm_sq, trace_cov, loo_sum, gsnr_sum, gsnr_count, gate = S.T
    if sq is None:  # no standard errors asked: nan leave-one-out values
        sq = dot = np.full((sums.shape[0], b), math.nan)
    sqg, dotg = add(sq), add(dot)
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


def _per_tensor_sums(S: Tensor, m2: Tensor, sizes: list[int], b: int) -> np.ndarray:
    r"""The ``(T, 6)`` per-tensor sums :func:`_group_summaries` takes, from the flat column sums
    ``S`` and centered sums of squares ``m2`` (the selected tensors concatenated, ``sizes``
    elements each) of a batch of ``b`` examples."""
    # On views of the flat vectors (P-sized temporaries cost more to allocate than the arithmetic).
    # With r_k = S_k^2 / m2_k = b^2 gbar_k^2 / m2_k: SNR_k = (b-1)/b r_k, GSNR_k = (b-1)/b^2 r_k;
    # r_k is inf where m2_k = 0 < S_k^2 (no variance: gated, no GSNR) and nan for 0/0 (neither).
    gate_r = (1 + GATE_MARGIN) * b / (b - 1)
    dt64 = torch.float64
    rows = []
    with torch.no_grad():
        for sp, m2p in zip(S.split(sizes), m2.split(sizes)):  # (sums accumulated in float64)
            r = (sp * sp).div_(m2p)
            gated = (r > gate_r).sum()
            gsnr = r.nan_to_num_(nan=0.0, posinf=0.0).sum(dtype=dt64) * ((b - 1) / b**2)
            rows.append(torch.stack([(sp * sp).sum(dtype=dt64) / b**2, m2p.sum(dtype=dt64) / (b - 1), gsnr,
                                     (m2p > 0).sum().to(dt64), gated.to(dt64)]))
        per_t = torch.stack(rows).cpu().numpy()
    return np.concatenate([per_t[:, :2], per_t[:, 1:2] / b, per_t[:, 2:]], 1)
