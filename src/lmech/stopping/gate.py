r"""Stop when the leave-one-out gate opens no more coordinates than pure noise would (lmech's own).

Signal: ``gate_fraction`` of :func:`lmech.probes.grad_noise` on the training examples (or a large
batch of them): the fraction of coordinates :math:`k` with

.. math:: \bar g_k^2 > \hat s_k = \frac{\hat\sigma_k^2}{b},

the :math:`\alpha = 1` gate of PopRiskAdamW (Litman & Guo 2026, Algorithm 1 / Thm 6.5 as
reconstructed in ``shared/research/generalization-theory.md`` 1.6): coordinate :math:`k` "passes"
when its batch signal exceeds its leave-one-out noise, i.e. when a step along it lowers the
*population* risk to first order. With no signal at all (:math:`\mu_k = 0`, Gaussian per-example
gradients), :math:`b\,\bar g_k^2/\hat\sigma_k^2 = t_k^2` with :math:`t_k` Student-t on
:math:`b-1` degrees of freedom, so the gate fraction of pure noise is

.. math:: f_0(b) = P(|t_{b-1}| > 1) \quad (0.3173 \text{ for } b \to \infty).

The rule fires when the measured fraction has been at most ``factor`` :math:`\times f_0(b)` for
``patience`` consecutive evaluations: the gradient has no more coordinates with population signal
than noise alone would give, so further steps fit the sample, not the population. The selected
step is the first evaluation of that run (:class:`lmech.stopping.base.ThresholdRule`).

This is a count over coordinates; the evidence-based baseline
(:mod:`lmech.stopping.evidence`) averages the same per-coordinate ratio instead.

Example:
    >>> from lmech.stopping import GateFractionStopping, null_gate_fraction
    >>> round(null_gate_fraction(10_000), 4)
    0.3173
    >>> s = GateFractionStopping(batch_size=256, patience=2)
    >>> [s.update(t, gate_fraction=f) for t, f in enumerate([0.9, 0.5, 0.3, 0.29])]
    [False, False, False, True]
    >>> s.best_step
    2
"""

from __future__ import annotations

from lmech.errors import ConfigError
from lmech.stopping.base import ThresholdRule

__all__ = ["GateFractionStopping", "null_gate_fraction"]


def null_gate_fraction(batch_size: int) -> float:
    r""":math:`f_0(b) = P(|t_{b-1}| > 1)`: the expected gate fraction of zero-mean Gaussian gradients."""
    if batch_size < 3:
        raise ConfigError(f"batch_size must be >= 3 for a leave-one-out gate, got {batch_size}")
    from scipy.stats import t

    return float(2.0 * t.sf(1.0, batch_size - 1))


class GateFractionStopping(ThresholdRule):
    """Fire when ``gate_fraction <= factor * null_gate_fraction(batch_size)`` ``patience`` times in a row."""

    needs = ("gate_fraction",)
    name = "gate-fraction"

    def __init__(self, batch_size: int, factor: float = 1.0, patience: int = 5, min_step: int = 0):
        if not factor > 0:
            raise ConfigError(f"factor must be positive, got {factor}")
        self.threshold = factor * null_gate_fraction(batch_size)
        super().__init__(patience, min_step)

    def _condition(self, value: float) -> bool:
        return value <= self.threshold
