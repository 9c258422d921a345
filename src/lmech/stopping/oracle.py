r"""The oracle: the step of the smallest held-out loss -- the reference every criterion is scored against.

Only held-out data can find it (``uses_heldout = True``). As a live rule it is patience on the
held-out loss (signal ``heldout_loss``); with ``patience`` larger than the run, it selects the
exact minimum over all evaluations, which is how the benchmark scores the other rules
(:func:`oracle_step`).

Example:
    >>> from lmech.stopping import oracle_step
    >>> oracle_step([0, 10, 20, 30], [0.9, 0.4, 0.5, 0.6])
    10
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lmech.stopping.base import MinimumRule

__all__ = ["OracleStopping", "oracle_step"]


class OracleStopping(MinimumRule):
    needs = ("heldout_loss",)
    uses_heldout = True
    name = "oracle (held-out)"


def oracle_step(steps: Sequence[int], heldout_losses: Sequence[float]) -> int:
    """The step with the smallest held-out loss (the first one on ties; ``nan`` entries skipped)."""
    losses = np.asarray(heldout_losses, dtype=float)
    if not np.isfinite(losses).any():
        raise ValueError("no finite held-out loss to take the minimum of")
    return int(np.asarray(steps)[int(np.nanargmin(losses))])
