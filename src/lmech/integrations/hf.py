"""A Hugging Face ``transformers`` ``TrainerCallback`` that runs an :class:`lmech.Monitor`.

Needs the extra ``lmech[hf]`` (``transformers`` and ``accelerate``). Importing this module imports
``transformers``; ``import lmech`` never does.

.. code-block:: python

    from lmech.integrations.hf import MonitorCallback

    cb = MonitorCallback(loss_fn, probe_batch, probes="economy", every=100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.attach(trainer)       # optional: Monitor scalars also go to trainer.log (report_to)
    trainer.train()

``probe_batch`` is ``(inputs, targets)`` (``model(input_ids)``) or a dict the way a data
collator builds it (``model(**batch)``, and ``loss_fn(logits, batch)`` gets the dict): see
:mod:`lmech.core.batch`. Hugging Face models return a ``ModelOutput``; ``output="logits"``
(default) is the Monitor's ``output=`` option: ``loss_fn`` and the probes see that field.
Measurements happen at the start of training (step 0) and whenever ``state.global_step`` is a
multiple of ``every``, with the trainer's optimizer (unwrapped from ``accelerate``'s wrapper)
for the Adam-preconditioned sharpness.

With the trainer known (``trainer=`` or :meth:`MonitorCallback.attach`) the scalars of every
measurement are also passed to ``trainer.log`` on the main process only (rank 0), so they reach
the trainer's own loggers (``report_to``: TensorBoard, W&B, MLflow, ...) at
``state.global_step``, beside any lmech sink. A ``TrainerCallback`` is not given the trainer by
``transformers``, hence the explicit link.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("lmech.integrations.hf needs transformers: pip install 'lmech[hf]'") from e

from lmech.monitor import Monitor, split_metrics

__all__ = ["MonitorCallback", "OutputOf"]


class OutputOf(nn.Module):
    """``model(*inputs)[field]`` (or ``getattr``) as a module: a tensor-valued view of a model
    that returns a ``ModelOutput`` or a dict. Parameters are the wrapped model's, under the
    prefix ``model.``. Every probe and the Monitor take ``output=field`` instead (same result,
    the model's own parameter names); this class stays for code that wraps models itself."""

    def __init__(self, model: nn.Module, field: str = "logits"):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, *inputs):
        out = self.model(*inputs)
        if isinstance(out, dict) or hasattr(out, "keys"):
            return out[self.field]
        return getattr(out, self.field)


class MonitorCallback(TrainerCallback):
    """``TrainerCallback`` wrapping :class:`lmech.Monitor`.

    Args are those of :class:`lmech.Monitor` except ``model`` (the trainer's), plus ``output``:
    the field of the model's output that ``loss_fn`` and the probes see (``None``: the raw
    output; any form of :mod:`lmech.core.batch`), and ``trainer``: forward the scalars to
    ``trainer.log`` (module docstring). The monitor is built at ``on_train_begin`` and available
    as :attr:`monitor`.
    """

    def __init__(self, loss_fn: Callable, probe_batch, probes="economy", every: int = 100,
                 budget_mb: float = 512, sinks=None, output="logits", trainer=None, **monitor_kwargs):
        self._args = dict(loss_fn=loss_fn, probe_batch=probe_batch, probes=probes, every=every,
                          budget_mb=budget_mb, sinks=sinks, output=output, **monitor_kwargs)
        self.output = output
        self.trainer = trainer
        self.monitor: Monitor | None = None

    def attach(self, trainer) -> "MonitorCallback":
        """Add this callback to ``trainer`` (if not there yet) and forward scalars to its log."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _measure(self, state, optimizer) -> None:
        metrics = self.monitor.step(state.global_step, optimizer=_unwrap(optimizer))
        if metrics is None or self.trainer is None or not state.is_world_process_zero:
            return
        scalars, _ = split_metrics(metrics)
        if scalars:
            self.trainer.log(scalars)  # at state.global_step, through every report_to logger

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.monitor = Monitor(model, **self._args)
        self._measure(state, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0:
            self._measure(state, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()


def _unwrap(optimizer):
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer
