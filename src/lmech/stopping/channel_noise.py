r"""Stop where the label noise entering the signal channel outweighs the fit (lmech's own criterion,
from the gramian's channel / reservoir split).

Reading (``shared/research/generalization-theory.md`` 1.3-1.4 and check 5; the paper's own
formula for "the noise in the signal channel" was not recovered, so this is our construction).
The cumulative dissipation Gramian :math:`W_S(0,t)` of :class:`lmech.probes.gramian.PathRecorder`
has eigenpairs :math:`(\omega_j, \psi_j)`; mode :math:`j` has dissipated the fraction
:math:`\phi_j = \min(\omega_j/\omega_\text{sat}, 1)` of its loss (:math:`\omega_\text{sat} = n/2`
for the squared loss: the frozen-kernel saturation :math:`\frac n2(1-e^{-2\lambda t/n})`). Label
noise :math:`\varepsilon` with variance :math:`\sigma^2` per response is isotropic, so the noise
energy training has pulled into the channel is, in expectation,

.. math:: \mathbb E\sum_j \phi_j\langle\psi_j,\varepsilon\rangle^2 = \sigma^2\,\mathrm{df}_W(t),
          \qquad \mathrm{df}_W(t) = \sum_j \phi_j ,

the soft channel dimension. :math:`\sigma^2` is estimated, without clean labels, from what is
left in the reservoir: the current residual :math:`r_t = u_t - y` has per-direction energy
:math:`c_j = \langle\psi_j, r_t\rangle^2`, and the reservoir-weighted mean

.. math:: \hat\sigma^2_t = \frac{\sum_j (1-\phi_j)\,c_j}{\sum_j (1-\phi_j)}

is the energy per untouched direction (conservative: it also holds signal training has not
reached yet). Adding the channel noise to the training loss as a Mallows-:math:`C_p`-type
optimism gives the monitored estimate

.. math:: \widehat R_\text{cn}(t) = \Phi_S(t) + \frac{\hat\sigma^2_t\,\mathrm{df}_W(t)}{N},

(:math:`N = n o` responses; half squared error per example as :math:`\Phi_S`), and the rule selects
its minimum (:class:`lmech.stopping.base.MinimumRule` on the signal ``channel_noise_risk``).
For a linear smoother :math:`H` with frozen kernel, :math:`\phi_j = 1-(1-h_j)^2`, so
:math:`\mathrm{df}_W \in [\mathrm{tr}\,H, 2\,\mathrm{tr}\,H]`: the penalty is between the
:math:`C_p` optimism and twice it. Squared loss only (the saturation and the noise model are
those of the squared loss).

Example:
    >>> import torch
    >>> from lmech.probes.gramian import channel_split
    >>> W = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    >>> split = channel_split(W, saturation=2.0)
    >>> r = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)               # residual left in the reservoir
    >>> # phi = (1, 0.5, 0), df_W = 1.5; sigma^2 = (0.5*0 + 1*1) / 1.5; 0.125 + sigma^2 * 1.5 / 3
    >>> round(channel_noise_risk(split, r, phi_S=0.125), 4)
    0.4583
"""

from __future__ import annotations

import torch

from lmech.stopping.base import MinimumRule

__all__ = ["ChannelNoiseStopping", "channel_noise_risk", "channel_noise_signals"]


def channel_noise_risk(split, residual: torch.Tensor, phi_S: float) -> float:
    r""":math:`\Phi_S + \hat\sigma^2\,\mathrm{df}_W/N` (module docstring) from a
    :class:`lmech.probes.gramian.ChannelSplit`, the flat current residual :math:`u_t - y` and the
    training loss :math:`\Phi_S(t)`."""
    phi = torch.from_numpy(split.phi)                                   # (N,) dissipated fractions
    c = split.projections(residual)                                     # (N,) <psi_j, r>^2
    c = torch.from_numpy(c)
    keep = 1.0 - phi
    if float(keep.sum()) <= 0:
        return float("nan")                                             # no reservoir left to read the noise from
    sigma2 = float((keep * c).sum() / keep.sum())
    return float(phi_S) + sigma2 * float(phi.sum()) / phi.numel()


def channel_noise_signals(recorder, readout) -> dict[str, float]:
    """``{"channel_noise_risk", "channel_df"}`` from a :class:`PathRecorder` (at its current weights)
    and its :meth:`~lmech.probes.gramian.PathRecorder.readout` of the cumulative window."""
    u_S, _ = recorder.outputs()
    residual = (u_S.double() - recorder.y.double().reshape(u_S.shape)).reshape(-1)
    phi_S = 0.5 * float(residual.pow(2).sum()) / recorder.n
    return {"channel_noise_risk": channel_noise_risk(readout.split, residual, phi_S),
            "channel_df": float(readout.split.phi.sum())}


class ChannelNoiseStopping(MinimumRule):
    """Minimum of ``channel_noise_risk`` (:func:`channel_noise_risk`)."""

    needs = ("channel_noise_risk",)
    name = "channel-noise"
