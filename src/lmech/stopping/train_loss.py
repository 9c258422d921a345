r"""Patience on the training loss -- a baseline.

The classic rule applied to the only loss a validation-free loop has: select the step of the
smallest training loss :math:`\Phi_S(t)` and stop after ``patience`` evaluations without a relative
improvement of ``min_delta`` (:class:`lmech.stopping.base.MinimumRule` on the signal ``loss``).
On a network that can interpolate, the training loss keeps falling, so this rule stops only when
progress has slowed below ``min_delta`` per evaluation.

Example:
    >>> from lmech.stopping import TrainLossPatience
    >>> s = TrainLossPatience(patience=2, min_delta=0.01)
    >>> [s.update(t, loss=v) for t, v in enumerate([1.0, 0.5, 0.499, 0.498])]
    [False, False, False, True]
    >>> s.best_step
    1
"""

from __future__ import annotations

from lmech.stopping.base import MinimumRule

__all__ = ["TrainLossPatience"]


class TrainLossPatience(MinimumRule):
    needs = ("loss",)
    name = "train-loss patience"
