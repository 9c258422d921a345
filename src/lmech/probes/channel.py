r"""Readouts of a recorded window: the signal channel / reservoir split of :math:`W_S`
(:func:`channel_split`, :class:`ChannelSplit`) and everything
:meth:`lmech.probes.gramian.PathRecorder.readout` measures (:class:`GramianReadout`).

The cut (``cutoff="frozen"``): an eigenvector of :math:`W_S` with eigenvalue :math:`\omega` is in the
channel iff :math:`\omega \ge (1-e^{-2})/(2\bar b)`; the frozen-kernel formula
:math:`\omega = \frac n2(1 - e^{-2\lambda T/n})` (:func:`frozen_gramian_eigenvalues`) puts it at
:math:`\lambda T/n = 1`, a mode that dissipated at least 86.5% of its loss (docs/gramian-decisions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["CUT_FRACTION", "ChannelSplit", "GramianReadout", "channel_split", "frozen_gramian_eigenvalues"]

CUT_FRACTION = 1.0 - math.exp(-2.0)
"""Dissipated fraction of a mode at :math:`\\lambda T / n = 1` (frozen kernel): :math:`1 - e^{-2}`."""


def frozen_gramian_eigenvalues(kernel_eigenvalues, time: float, n: int):
    r"""Frozen-kernel (gradient-flow, squared loss) eigenvalues of :math:`W_S(0, T)`:
    :math:`\frac n2\,(1 - e^{-2\lambda T/n})` for each eigenvalue :math:`\lambda` of :math:`K`.

    Example:
        >>> float(frozen_gramian_eigenvalues(np.array([1e9]), 1.0, 10)[0])
        5.0
    """
    lam = np.asarray(kernel_eigenvalues, dtype=np.float64)
    return 0.5 * n * -np.expm1(-2.0 * np.clip(lam, 0, None) * time / n)


@dataclass
class ChannelSplit:
    r"""Eigen-decomposition of :math:`W_S` and its split into signal channel and reservoir.

    Attributes:
        eigenvalues: descending, float64 numpy array (:math:`\omega_j`).
        eigenvectors: ``(N, N)`` tensor, column ``j`` belongs to ``eigenvalues[j]``.
        cutoff: the cut :math:`c`; ``channel = eigenvalues >= c``.
        rule: how the cut was chosen (``"frozen"``, ``"relative"``, ``"absolute"``).
        n_channel: number of channel directions.
        gap_ratio: smallest channel eigenvalue / largest reservoir eigenvalue (``inf`` if either
            side is empty): how clean the cut is (1 = no gap).
        near_cut_fraction: fraction of eigenvalues within a factor 2 of the cut.
        saturation: :math:`1/(2\bar b)`, the frozen-kernel saturation value (``n/2`` for MSE),
            used for the dissipated fractions ``phi`` :math:`=\min(\omega_j/\text{saturation}, 1)`.
    """

    eigenvalues: np.ndarray
    eigenvectors: Tensor
    cutoff: float
    rule: str
    n_channel: int
    gap_ratio: float
    near_cut_fraction: float
    saturation: float

    @property
    def channel(self) -> np.ndarray:
        return self.eigenvalues >= self.cutoff

    @property
    def phi(self) -> np.ndarray:
        return np.clip(self.eigenvalues / self.saturation, 0.0, 1.0)

    def energies(self, v: Tensor) -> dict[str, float]:
        r"""Energy of a vector :math:`v` (length :math:`N`) in the channel and the reservoir.

        ``total`` :math:`=\|v\|^2`, ``channel`` :math:`=\|\Pi_C v\|^2`, ``reservoir``
        :math:`=\|\Pi_R v\|^2`, ``channel_soft`` :math:`=\sum_j\phi_j c_j^2` (cutoff-free) and
        ``reservoir_fraction`` :math:`=\|\Pi_R v\|^2/\|v\|^2`.
        """
        c2 = (self.eigenvectors.T @ v.double().reshape(-1)).pow(2).numpy()
        total = float(c2.sum())
        ch = float(c2[self.channel].sum())
        res = total - ch
        return dict(total=total, channel=ch, reservoir=res, channel_soft=float((self.phi * c2).sum()),
                    reservoir_fraction=res / total if total > 0 else float("nan"))

    def projections(self, v: Tensor) -> np.ndarray:
        """Squared coefficients :math:`c_j^2 = \\langle\\psi_j, v\\rangle^2` in eigenvalue order."""
        return (self.eigenvectors.T @ v.double().reshape(-1)).pow(2).numpy()


def channel_split(W: Tensor, cutoff: float | str = "frozen", *, saturation: float,
                  rel_cutoff: float = 1e-2) -> ChannelSplit:
    r"""Split output-gradient space by the eigenvalues of :math:`W_S` (module docstring).

    ``cutoff``: ``"frozen"`` (:math:`c = (1-e^{-2})\,\text{saturation}`), ``"relative"``
    (:math:`c = \text{rel\_cutoff}\cdot\omega_{\max}`) or a number (absolute).

    Example:
        >>> s = channel_split(torch.diag(torch.tensor([5.0, 4.0, 0.1], dtype=torch.float64)), saturation=5.0)
        >>> s.n_channel, round(s.cutoff, 4)
        (1, 4.3233)
    """
    Ws = (W + W.T) / 2
    vals, vecs = torch.linalg.eigh(Ws.double())
    vals, vecs = vals.flip(0), vecs.flip(1)
    ev = vals.numpy().copy()
    if isinstance(cutoff, str):
        if cutoff == "frozen":
            cut, rule = CUT_FRACTION * saturation, "frozen"
        elif cutoff == "relative":
            if not 0 < rel_cutoff < 1:
                raise ValueError(f"rel_cutoff must be in (0, 1), got {rel_cutoff}")
            cut, rule = rel_cutoff * float(max(ev[0], 0.0)), "relative"
        else:
            raise ValueError(f"cutoff must be 'frozen', 'relative' or a number, got {cutoff!r}")
    else:
        cut, rule = float(cutoff), "absolute"
        if not cut > 0:
            raise ValueError(f"an absolute cutoff must be positive, got {cutoff}")
    channel = ev >= cut
    n_ch = int(channel.sum())
    if 0 < n_ch < len(ev):
        gap = float(ev[n_ch - 1] / ev[n_ch]) if ev[n_ch] > 0 else float("inf")
    else:
        gap = float("inf")
    near = float(np.mean((ev >= cut / 2) & (ev <= 2 * cut))) if len(ev) else 0.0
    return ChannelSplit(ev, vecs, float(cut), rule, n_ch, gap, near, float(saturation))


@dataclass
class GramianReadout:
    r"""Everything :meth:`PathRecorder.readout` measures on one window (module docstring).

    Scalars (``nan`` when not applicable): ``time`` (:math:`T = \sum\eta`), ``steps``,
    ``dissipation_predicted`` (:math:`g_s^\top W_S g_s`), ``dissipation_actual``
    (:math:`\Phi_S(s)-\Phi_S(T)`), ``dissipation_rel_err``; ``coupling_corr`` /
    ``coupling_rel_err`` (:math:`A\,\Delta U_S` vs the actual :math:`\Delta U_Q`, Pearson
    correlation over all entries and :math:`\|\text{pred}-\text{actual}\|/\|\text{actual}\|`);
    ``response_corr`` / ``response_rel_err`` (:math:`-G_Q g_s` vs :math:`\Delta U_Q`);
    ``invisibility`` (:math:`\max_\psi \|G_Q\psi\|/\|G_Q\|_2` over eigenvectors with
    :math:`|\omega| \le` ``null_tol`` :math:`\omega_{\max}`), ``n_null`` (their number),
    ``invisibility_bound_ok`` (every :math:`\|G_Q\psi_j\|^2 \le c_Q\,\omega_j` up to rounding: the
    Cauchy-Schwarz form of Prop. 3.2, exact for the discrete sums; ``None`` with momentum, where
    :math:`G_Q` and :math:`W_S` no longer share the factor :math:`J_S^\top P_k`);
    ``drift_op`` / ``drift_fro`` / ``drift_distance`` (:class:`lmech.probes.ntk.KernelDrift` of the
    last driving kernel against the first), ``kernel_norm_ratio`` (:math:`\|K_t\|_2/\|K_0\|_2`).

    ``split``: the :class:`ChannelSplit`; ``energies``: ``{"residual" | "clean" | "noise":
    ChannelSplit.energies(...)}`` of :math:`n\,g_s` (the residual for MSE) and of its clean-label
    and label-noise parts (when clean targets were given); ``noise_transfer``: :math:`\|G_Q
    g_\text{noise}\|^2/m`, the test-output displacement the label noise caused, per query example.
    ``extras``: ``G_psi_over_G`` (:math:`\|G_Q\psi_j\|/\|G_Q\|_2` per eigenvector) and ``projections``
    (:meth:`ChannelSplit.projections` of each energy part).
    """

    time: float
    steps: int
    split: ChannelSplit
    energies: dict[str, dict[str, float]]
    dissipation_predicted: float
    dissipation_actual: float
    dissipation_rel_err: float
    coupling_corr: float
    coupling_rel_err: float
    response_corr: float
    response_rel_err: float
    invisibility: float
    n_null: int
    invisibility_bound_ok: bool | None
    drift_op: float
    drift_fro: float
    drift_distance: float
    kernel_norm_ratio: float
    noise_transfer: float
    extras: dict = field(default_factory=dict)

    @property
    def eigenvalues(self) -> np.ndarray:
        return self.split.eigenvalues

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat dict of the scalar readouts (energies as ``<part>_<cell>``), ready for ``run.log``."""
        out = {k: float(getattr(self, k)) for k in (
            "time", "dissipation_predicted", "dissipation_actual", "dissipation_rel_err", "coupling_corr",
            "coupling_rel_err", "response_corr", "response_rel_err", "invisibility", "drift_op", "drift_fro",
            "drift_distance", "kernel_norm_ratio", "noise_transfer")}
        out["n_null"] = float(self.n_null)
        out["n_channel"] = float(self.split.n_channel)
        out["cutoff"] = self.split.cutoff
        out["gap_ratio"] = self.split.gap_ratio
        out["near_cut_fraction"] = self.split.near_cut_fraction
        for part, e in self.energies.items():
            for cell, v in e.items():
                out[f"{part}_{cell}"] = v
        return {prefix + k: v for k, v in out.items()}


def _corr_relerr(pred: Tensor, actual: Tensor) -> tuple[float, float]:
    a, p = actual.reshape(-1).double(), pred.reshape(-1).double()
    na = float(a.norm())
    rel = float((p - a).norm()) / na if na > 0 else float("nan")
    if a.numel() < 2 or float(a.std()) == 0 or float(p.std()) == 0:
        return float("nan"), rel
    return float(torch.corrcoef(torch.stack([p, a]))[0, 1]), rel
