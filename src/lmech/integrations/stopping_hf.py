"""HF ``Trainer`` adapter for :mod:`lmech.stopping`: a ``TrainerCallback`` that feeds a criterion
and ends training.

Needs ``lmech[hf]``; importing this module imports ``transformers``, ``import lmech`` never does.

.. code-block:: python

    from lmech.integrations.stopping_hf import StoppingCallback
    from lmech.stopping import TrainLossPatience

    trainer = transformers.Trainer(..., callbacks=[StoppingCallback(TrainLossPatience(patience=5))])

At every log event (``logging_steps``) the criterion gets the logged scalars (the Trainer logs the
training loss as ``loss``) merged with ``signals(model)`` if given (e.g. a closure over
:func:`lmech.stopping.gradient_signals`); when it fires, ``control.should_training_stop`` is set.
"""

from __future__ import annotations

from typing import Callable

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("lmech.integrations.stopping_hf needs transformers: pip install 'lmech[hf]'") from e

from lmech.errors import ConfigError
from lmech.stopping.base import StoppingCriterion

__all__ = ["StoppingCallback"]


class StoppingCallback(TrainerCallback):
    """Drive a :class:`lmech.stopping.StoppingCriterion` from ``Trainer.train`` (module docstring)."""

    def __init__(self, criterion: StoppingCriterion, signals: Callable[[object], dict] | None = None):
        if not isinstance(criterion, StoppingCriterion):
            raise ConfigError(f"criterion must be an lmech.stopping criterion, got {type(criterion).__name__}")
        self.criterion, self.signals = criterion, signals

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" not in values:          # evaluation or end-of-training logs: not a training step
            return control
        if self.signals is not None:
            values.update(self.signals(model))
        if self.criterion.update(int(state.global_step), **values):
            control.should_training_stop = True
        return control
