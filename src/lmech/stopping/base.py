r"""The stopping-criterion protocol shared by every rule in :mod:`lmech.stopping`.

A criterion is fed, once per evaluation, the training step and named scalar *signals*
(``stopper.update(step, loss=..., poprisk_loo=...)``); it says whether to stop
(:attr:`StoppingCriterion.should_stop`), at which step it decided (:attr:`stop_step`) and which
step's weights it selects (:attr:`best_step`; the loop keeps that checkpoint if it wants to roll
back). It owns no loop, no model and no data: any training loop, the Lightning and HF adapters
(:mod:`lmech.integrations.stopping_lightning`, :mod:`lmech.integrations.stopping_hf`) and the
benchmark replay of logged signals drive the same object.

Two families:

* :class:`MinimumRule` -- select the step where a signal :math:`s_t` is smallest; stop after
  ``patience`` updates without a relative improvement of ``min_delta``:
  :math:`s_t < (1 - \delta)\min_{t'<t} s_{t'}` counts as an improvement.
* :class:`ThresholdRule` -- stop once a condition on the signal has held for ``patience``
  consecutive updates; the selected step is the first update of that run.

Both ignore updates before ``min_step`` (the first steps of training, where every signal is
still moving fast).
"""

from __future__ import annotations

import math
from typing import Iterable

from lmech.errors import ConfigError

__all__ = ["StoppingCriterion", "MinimumRule", "ThresholdRule", "replay"]


class StoppingCriterion:
    """Base class. Subclasses set :attr:`needs` and implement :meth:`_observe`.

    Attributes:
        needs: names of the signals :meth:`update` requires.
        uses_heldout: True only for the oracle (it reads held-out data).
        name: short label for tables.
    """

    needs: tuple[str, ...] = ()
    uses_heldout: bool = False
    name: str = "criterion"

    def __init__(self, patience: int = 5, min_step: int = 0):
        if not (isinstance(patience, int) and patience >= 1):
            raise ConfigError(f"patience must be a positive integer (updates), got {patience!r}")
        if min_step < 0:
            raise ConfigError(f"min_step must be >= 0, got {min_step}")
        self.patience = patience
        self.min_step = min_step
        self.reset()

    def reset(self) -> None:
        self.should_stop = False
        self.stop_step: int | None = None
        self.best_step: int | None = None
        self.last_step: int | None = None
        self.history: list[tuple[int, float]] = []

    def update(self, step: int, **signals: float) -> bool:
        """Feed one evaluation; returns :attr:`should_stop`. Updates after a stop are ignored."""
        if self.should_stop:
            return True
        missing = [k for k in self.needs if k not in signals]
        if missing:
            raise ConfigError(f"{self.name} needs the signal(s) {missing} in update(step, ...); got "
                              f"{sorted(signals)}")
        step = int(step)
        self.last_step = step
        value = float(signals[self.needs[0]]) if self.needs else float("nan")
        value = self._value(value, signals)
        self.history.append((step, value))
        if step < self.min_step or not math.isfinite(value):
            return False
        if self._observe(step, value):
            self.should_stop = True
            self.stop_step = step
        return self.should_stop

    def _value(self, value: float, signals: dict) -> float:
        """The monitored number from the signals (default: the first needed signal)."""
        return value

    def _observe(self, step: int, value: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def selected_step(self) -> int | None:
        """:attr:`best_step` if the rule has one, else the last step seen (the rule never fired
        and training ran to the end)."""
        return self.best_step if self.best_step is not None else self.last_step

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patience={self.patience}, min_step={self.min_step})"


class MinimumRule(StoppingCriterion):
    """Select the minimum of the monitored value; stop after ``patience`` updates without improvement."""

    def __init__(self, patience: int = 5, min_step: int = 0, min_delta: float = 0.0):
        if not 0.0 <= min_delta < 1.0:
            raise ConfigError(f"min_delta (relative) must be in [0, 1), got {min_delta}")
        self.min_delta = min_delta
        super().__init__(patience, min_step)

    def reset(self) -> None:
        super().reset()
        self.best_value = math.inf
        self._wait = 0

    def _observe(self, step: int, value: float) -> bool:
        threshold = self.best_value - self.min_delta * abs(self.best_value) if math.isfinite(self.best_value) \
            else math.inf
        if value < threshold:
            self.best_value, self.best_step, self._wait = value, step, 0
            return False
        if self.best_step is None:
            self.best_value, self.best_step = value, step
        self._wait += 1
        return self._wait >= self.patience


class ThresholdRule(StoppingCriterion):
    """Stop once :meth:`_condition` holds for ``patience`` consecutive updates."""

    def reset(self) -> None:
        super().reset()
        self._run_start: int | None = None
        self._run = 0

    def _condition(self, value: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _observe(self, step: int, value: float) -> bool:
        if self._condition(value):
            if self._run == 0:
                self._run_start = step
            self._run += 1
        else:
            self._run, self._run_start = 0, None
        if self._run >= self.patience:
            self.best_step = self._run_start
            return True
        return False


def replay(criterion: StoppingCriterion, rows: Iterable[dict], step_key: str = "step") -> StoppingCriterion:
    """Feed logged rows (dicts with ``step`` and the signals) to ``criterion`` in order, stopping at
    its decision, exactly as the live loop would have: the rule only ever sees the past."""
    criterion.reset()
    for row in rows:
        if criterion.update(int(row[step_key]), **{k: v for k, v in row.items() if k != step_key}):
            break
    return criterion
