"""A PyTorch Lightning callback that runs an :class:`lmech.Monitor` during ``Trainer.fit``.

Needs the extra ``lmech[lightning]`` (``lightning``; the older ``pytorch_lightning`` package works
too). Importing this module imports Lightning; ``import lmech`` never does.

.. code-block:: python

    from lmech.integrations.lightning import MonitorCallback

    cb = MonitorCallback(loss_fn, (x_probe, y_probe), probes="economy", every=100)
    trainer = lightning.Trainer(max_steps=1000, callbacks=[cb])
    trainer.fit(module, loader)
    cb.monitor.history.scalars()      # or sinks=[TensorBoardSink(...), run]

The monitor measures the ``LightningModule`` itself (its ``forward`` must map the probe inputs to
the outputs ``loss_fn`` expects) once before the first step (step 0) and then whenever
``trainer.global_step`` (optimizer steps taken) is a multiple of ``every``, with the first
optimizer of the trainer (for the Adam-preconditioned sharpness).

The scalars of every measurement also go to the trainer's own loggers (``trainer.loggers``:
TensorBoard, W&B, MLflow, CSV, ...) with ``log_metrics(scalars, step=trainer.global_step)``, on
global rank 0 only, beside any lmech sink; ``log_to_trainer=False`` turns that off.
``probe_batch`` takes every form of :mod:`lmech.core.batch` (dicts, ``output=``).
"""

from __future__ import annotations

from typing import Callable

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("lmech.integrations.lightning needs Lightning: pip install 'lmech[lightning]'") from e

from lmech.monitor import Monitor, split_metrics

__all__ = ["MonitorCallback"]


class MonitorCallback(Callback):
    """Lightning ``Callback`` wrapping :class:`lmech.Monitor`.

    Args are those of :class:`lmech.Monitor` except ``model``, which is the ``LightningModule``
    being fit, plus ``log_to_trainer`` (module docstring). The monitor is built at
    ``on_fit_start`` and available as :attr:`monitor`; its sinks are closed at ``on_fit_end``.
    """

    def __init__(self, loss_fn: Callable, probe_batch, probes="economy", every: int = 100,
                 budget_mb: float = 512, sinks=None, *, log_to_trainer: bool = True, **monitor_kwargs):
        super().__init__()
        self._args = dict(loss_fn=loss_fn, probe_batch=probe_batch, probes=probes, every=every,
                          budget_mb=budget_mb, sinks=sinks, **monitor_kwargs)
        self.log_to_trainer = log_to_trainer
        self.monitor: Monitor | None = None

    def _measure(self, trainer) -> None:
        step = trainer.global_step
        metrics = self.monitor.step(step, optimizer=self._optimizer(trainer))
        if metrics is None or not self.log_to_trainer or not trainer.is_global_zero:
            return
        scalars, _ = split_metrics(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.monitor = Monitor(pl_module, **self._args)

    def on_train_start(self, trainer, pl_module) -> None:
        self._measure(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step != getattr(self, "_last_step", None):  # once per optimizer step
            self._last_step = step
            self._measure(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()

    @staticmethod
    def _optimizer(trainer):
        opts = getattr(trainer, "optimizers", None) or []
        opt = opts[0] if opts else None
        inner = getattr(opt, "optimizer", None)  # Lightning may wrap the torch optimizer
        return inner if inner is not None and hasattr(inner, "param_groups") else opt
