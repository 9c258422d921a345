"""A Hugging Face ``transformers`` ``TrainerCallback`` that runs an :class:`lmech.Monitor`.

Needs the extra ``lmech[hf]`` (``transformers`` and ``accelerate``). Importing this module imports
``transformers``; ``import lmech`` never does.

.. code-block:: python

    from lmech.integrations.hf import MonitorCallback

    cb = MonitorCallback(loss_fn, (input_ids, labels), probes="economy", every=100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()

Hugging Face models return a ``ModelOutput``; with ``output="logits"`` (default) the monitor
measures :class:`OutputOf` ``(model, "logits")``, a wrapper module whose forward returns that
field, so ``loss_fn(logits, targets)`` and tensor-output probes (NTK) work. The wrapper holds the
same parameter objects: nothing is copied. The probe inputs are passed positionally
(``model(input_ids)``). Measurements happen at the start of training (step 0) and whenever
``state.global_step`` is a multiple of ``every``, with the trainer's optimizer (unwrapped from
``accelerate``'s wrapper) for the Adam-preconditioned sharpness.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("lmech.integrations.hf needs transformers: pip install 'lmech[hf]'") from e

from lmech.monitor import Monitor

__all__ = ["MonitorCallback", "OutputOf"]


class OutputOf(nn.Module):
    """``model(*inputs)[field]`` (or ``getattr``) as a module: a tensor-valued view of a model
    that returns a ``ModelOutput`` or a dict. Parameters are the wrapped model's, under the
    prefix ``model.``."""

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
    output). The monitor is built at ``on_train_begin`` and available as :attr:`monitor`.
    """

    def __init__(self, loss_fn: Callable, probe_batch, probes="economy", every: int = 100,
                 budget_mb: float = 512, sinks=None, output: str | None = "logits", **monitor_kwargs):
        self._args = dict(loss_fn=loss_fn, probe_batch=probe_batch, probes=probes, every=every,
                          budget_mb=budget_mb, sinks=sinks, **monitor_kwargs)
        self.output = output
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = model if self.output is None else OutputOf(model, self.output)
        self.monitor = Monitor(target, **self._args)
        self.monitor.step(state.global_step, optimizer=_unwrap(optimizer))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0:
            self.monitor.step(state.global_step, optimizer=_unwrap(optimizer))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()


def _unwrap(optimizer):
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer
