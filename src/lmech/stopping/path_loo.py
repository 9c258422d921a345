r"""Stop at the minimum of the path leave-one-out population-risk estimate (lmech's own criterion).

Signal: ``poprisk_loo`` (default) or ``poprisk_gcv``, logged at every
:meth:`lmech.probes.gramian.PathRecorder.step` (formulas in :mod:`lmech.probes.path_loo`). With
the recorder's path operator :math:`D` and the run's hat matrix :math:`H = D/n =
\partial U_S(t)/\partial y`,

.. math:: \widehat R_\text{loo}(t) = \frac1n\sum_i \ell\big(u_i + (I - H_{ii}B_i)^{-1}H_{ii}d_i,\ y_i\big),
          \qquad \widehat R_\text{gcv}(t) = \frac{\Phi_S(t)}{(1 - \mathrm{df}_t/r)^2}

(for one output and the squared loss :math:`\frac1n\sum_i\frac12(r_i/(1-h_{ii}))^2`). Both are
estimates of the held-out loss on *noisy* labels from the training run alone. The rule selects the
step of the smallest estimate and stops after ``patience`` evaluations without a relative
improvement ``min_delta`` (:class:`lmech.stopping.base.MinimumRule`).

Example:
    >>> from lmech.stopping import PathLOOStopping
    >>> s = PathLOOStopping(patience=2)
    >>> for step, r in enumerate([0.5, 0.4, 0.35, 0.36, 0.37]):
    ...     _ = s.update(step, poprisk_loo=r)
    >>> s.should_stop, s.best_step, s.stop_step
    (True, 2, 4)
"""

from __future__ import annotations

from lmech.errors import ConfigError
from lmech.stopping.base import MinimumRule

__all__ = ["PathLOOStopping"]


class PathLOOStopping(MinimumRule):
    """Minimum of ``poprisk_loo`` (``estimate="loo"``) or ``poprisk_gcv`` (``estimate="gcv"``)."""

    def __init__(self, estimate: str = "loo", patience: int = 5, min_step: int = 0, min_delta: float = 0.0):
        if estimate not in ("loo", "gcv"):
            raise ConfigError(f"estimate must be 'loo' or 'gcv', got {estimate!r}")
        self.needs = (f"poprisk_{estimate}",)
        self.name = f"path-{estimate}"
        super().__init__(patience, min_step, min_delta)
