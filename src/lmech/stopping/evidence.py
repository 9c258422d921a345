r"""The evidence-based (EB) criterion of Mahsereci, Balles, Lassner & Hennig (2017), *Early Stopping
without a Validation Set* (arXiv:1703.09580), Eq. 7 -- a baseline.

With per-example gradients :math:`g_i` of :math:`b` examples (the minibatch, or the whole training
set for full-batch descent), the mean :math:`\bar g_k` and the unbiased per-example variance
:math:`\hat\sigma^2_k = \frac1{b-1}\sum_i (g_{ik}-\bar g_k)^2` over the :math:`D` coordinates,

.. math:: \mathrm{EB} = 1 - \frac{b}{D}\sum_{k=1}^{D}\frac{\bar g_k^2}{\hat\sigma_k^2 + \epsilon},

and training stops when :math:`\mathrm{EB} > 0`: the gradient is, on average over coordinates,
within one standard error of zero, so it carries no more evidence about the population gradient
than noise would. This is the reading of Cockpit's ``EarlyStopping`` quantity (Schneider, Dangel &
Hennig 2021, ``cockpit/quantities/early_stopping.py``: ``1 - B * snr.mean()``,
:math:`\epsilon = 10^{-5}`). The paper smooths the criterion over steps; here ``patience``
consecutive positive evaluations play that role. :func:`eb_criterion` computes EB from a
:class:`lmech.probes.gradnoise_stats.GradNoise`.

Example:
    >>> from lmech.stopping import EvidenceStopping
    >>> s = EvidenceStopping(patience=1)
    >>> [s.update(t, eb=v) for t, v in enumerate([-5.0, -0.2, 0.1])]
    [False, False, True]
"""

from __future__ import annotations

from lmech.stopping.base import ThresholdRule

__all__ = ["EvidenceStopping", "eb_criterion"]


def eb_criterion(noise, epsilon: float = 1e-5) -> float:
    r""":math:`1 - \frac bD\sum_k \bar g_k^2/(\hat\sigma_k^2+\epsilon)` from a :class:`GradNoise`
    (its ``flat_mean`` :math:`\bar g` and centred sums of squares :math:`(b-1)\hat\sigma^2`)."""
    b = noise.batch_size
    var = noise.flat_m2 / (b - 1)
    snr = noise.flat_mean.square() / (var + epsilon)
    return float(1.0 - b * snr.mean())


class EvidenceStopping(ThresholdRule):
    """Fire when ``eb > 0`` for ``patience`` consecutive evaluations (signal ``eb``)."""

    needs = ("eb",)
    name = "evidence (EB)"

    def _condition(self, value: float) -> bool:
        return value > 0.0

