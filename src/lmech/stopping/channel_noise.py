r"""Stop where the label noise entering the signal channel outweighs the fit (lmech's own criterion,
from the gramian's channel / reservoir split).

Reading (``shared/research/generalization-theory.md`` 1.3-1.4 and check 5; the paper's own
formula for "the noise in the signal channel" was not recovered, so this is our construction).
The cumulative dissipation Gramian :math:`W_S(0,t)` of :class:`lmech.probes.gramian.PathRecorder`
has eigenvalues :math:`\omega_j`; mode :math:`j` has dissipated the fraction
:math:`\phi_j = \min(\omega_j/\omega_\text{sat}, 1)` of its loss (:math:`\omega_\text{sat} = n/2`
for the squared loss, the frozen-kernel saturation of :math:`\frac n2(1-e^{-2\lambda t/n})`).
The soft channel dimension :math:`\mathrm{df}_W = \sum_j\phi_j` counts the directions training has
opened; :math:`N - \mathrm{df}_W = \sum_j(1-\phi_j)` those still in the reservoir.

* **Noise in the channel.** Label noise with variance :math:`\sigma^2` per response is isotropic,
  so the noise energy pulled into the channel is, in expectation,
  :math:`\mathbb E\sum_j\phi_j\langle\psi_j,\varepsilon\rangle^2 = \sigma^2\,\mathrm{df}_W`.
* **Noise level from the reservoir.** With a frozen kernel the residual of mode :math:`j` is the
  initial one times :math:`1-h_j` and :math:`1-\phi_j = (1-h_j)^2`, so
  :math:`\mathbb E\|u_t - y\|^2 = \|(I-H)f\|^2 + \sigma^2\sum_j(1-\phi_j)`: the residual per
  reservoir direction,

  .. math:: \hat\sigma^2_t = \frac{\|u_t - y\|^2}{\sum_j (1-\phi_j)},

  estimates :math:`\sigma^2` without clean labels (conservatively: it also holds the signal
  training has not reached, :math:`\|(I-H)f\|^2`).

Adding the channel noise to the training loss (half squared error per example, like
:math:`\Phi_S`) gives the monitored estimate

.. math:: \widehat R_\text{cn}(t) = \Phi_S(t) + \frac{\hat\sigma^2_t\,\mathrm{df}_W(t)}{n}
          = \Phi_S(t)\,\frac{N + \mathrm{df}_W(t)}{N - \mathrm{df}_W(t)} \quad (o = 1),

Akaike's final prediction error with the Gramian's channel dimension as the number of fitted
parameters; the rule selects its minimum (:class:`lmech.stopping.base.MinimumRule` on the signal
``channel_noise_risk``). Under a frozen kernel :math:`\phi_j = 1-(1-h_j)^2`, so
:math:`\mathrm{df}_W \in [\mathrm{tr}\,H, 2\,\mathrm{tr}\,H]`. Squared loss only (the saturation
and the noise model are those of the squared loss).

Example:
    >>> import numpy as np
    >>> phi = np.array([1.0, 0.5, 0.0])                 # dissipated fractions, df_W = 1.5
    >>> round(channel_noise_risk(phi, residual_sq=1.5, n=3), 4)   # Phi_S = 0.25; 0.25 * 4.5 / 1.5
    0.75
"""

from __future__ import annotations

import numpy as np
import torch

from lmech.stopping.base import MinimumRule

__all__ = ["ChannelNoiseStopping", "channel_noise_risk", "channel_noise_signals"]


def channel_noise_risk(phi: np.ndarray, residual_sq: float, n: int) -> float:
    r""":math:`\Phi_S + \hat\sigma^2\,\mathrm{df}_W/n` (module docstring) from the dissipated fractions
    :math:`\phi_j` (length :math:`N`), :math:`\|u_t - y\|^2` and the number of examples :math:`n`."""
    phi = np.clip(np.asarray(phi, dtype=float), 0.0, 1.0)
    reservoir = float((1.0 - phi).sum())
    if reservoir <= 0:
        return float("nan")                      # no reservoir left to read the noise level from
    sigma2 = float(residual_sq) / reservoir
    # half squared error per example: the optimism of a linear smoother is sigma^2 tr(H) / n
    return 0.5 * float(residual_sq) / n + sigma2 * float(phi.sum()) / n


def channel_noise_signals(recorder) -> dict[str, float]:
    """``{"channel_noise_risk", "channel_df"}`` from a :class:`PathRecorder` at its current weights
    (the eigenvalues of its cumulative :math:`W_S` only; squared loss)."""
    if recorder.loss != "mse":
        raise ValueError("the channel-noise risk is defined for the squared loss (recorder loss='mse')")
    W = recorder.path.W
    omega = torch.linalg.eigvalsh((W + W.T) / 2).numpy()
    phi = np.clip(omega / (recorder.n / 2.0), 0.0, 1.0)
    u_S, _ = recorder.outputs()
    residual_sq = float((u_S.double() - recorder.y.double().reshape(u_S.shape)).pow(2).sum())
    return {"channel_noise_risk": channel_noise_risk(phi, residual_sq, recorder.n), "channel_df": float(phi.sum())}


class ChannelNoiseStopping(MinimumRule):
    """Minimum of ``channel_noise_risk`` (:func:`channel_noise_risk`)."""

    needs = ("channel_noise_risk",)
    name = "channel-noise"
