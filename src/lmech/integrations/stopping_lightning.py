"""Lightning adapter for :mod:`lmech.stopping`: a ``Callback`` that feeds a criterion and stops ``fit``.

Needs ``lmech[lightning]``; importing this module imports Lightning, ``import lmech`` never does.

.. code-block:: python

    from lmech.integrations.stopping_lightning import StoppingCallback
    from lmech.stopping import GateFractionStopping, gradient_signals

    cb = StoppingCallback(GateFractionStopping(batch_size=len(x)), every=50,
                          signals=lambda trainer, module: gradient_signals(module, loss_fn, x, y))
    trainer = lightning.Trainer(max_steps=10_000, callbacks=[cb])
    trainer.fit(module, loader)
    cb.criterion.best_step

Every ``every`` optimizer steps the criterion gets ``trainer.callback_metrics`` (what the module
logged with ``self.log``, e.g. ``loss``) merged with ``signals(trainer, module)`` if given; when it
fires, ``trainer.should_stop`` is set and Lightning ends the fit after the current step.
"""

from __future__ import annotations

from typing import Callable

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("lmech.integrations.stopping_lightning needs Lightning: pip install 'lmech[lightning]'") from e

from lmech.errors import ConfigError
from lmech.stopping.base import StoppingCriterion

__all__ = ["StoppingCallback"]


def _scalar(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class StoppingCallback(Callback):
    """Drive a :class:`lmech.stopping.StoppingCriterion` from ``Trainer.fit`` (module docstring)."""

    def __init__(self, criterion: StoppingCriterion, every: int = 1,
                 signals: Callable[[object, object], dict] | None = None):
        super().__init__()
        if not isinstance(criterion, StoppingCriterion):
            raise ConfigError(f"criterion must be an lmech.stopping criterion, got {type(criterion).__name__}")
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every must be a positive integer (optimizer steps), got {every!r}")
        self.criterion, self.every, self.signals = criterion, every, signals
        self._last_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step == 0 or step == self._last_step or step % self.every:
            return
        self._last_step = step
        values = {k: s for k, v in trainer.callback_metrics.items() if (s := _scalar(v)) is not None}
        if self.signals is not None:
            values.update(self.signals(trainer, pl_module))
        if self.criterion.update(step, **values):
            trainer.should_stop = True
