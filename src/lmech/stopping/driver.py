r"""Measure what a criterion needs and feed it: the plain-loop counterpart of the Lightning and HF callbacks.

A :class:`StoppingDriver` holds a :class:`~lmech.stopping.base.StoppingCriterion` and the sources of
its signals, all on *training* data:

* ``loss``, ``gate_fraction``, ``eb`` (and ``mean_gsnr``): :func:`lmech.stopping.gradient_signals` on
  ``batch`` with ``loss_fn``, measured at the evaluation;
* ``poprisk_loo``, ``poprisk_gcv``: the scalars of :meth:`lmech.probes.gramian.PathRecorder.step`,
  which must see every optimizer step (:meth:`after_step`, with the step's minibatch indices into
  the recorder's training set);
* ``channel_noise_risk``: :func:`lmech.stopping.channel_noise_signals` of the same recorder.

Only the signals the criterion's ``needs`` call for are measured. :meth:`observe` feeds
``criterion.update(step, **signals)`` exactly as the callbacks do with their ``signals=`` closures,
and returns the signals (for logging). The criterion never sees the loop's evaluation metrics,
which may be held-out ones: the oracle (``uses_heldout``) is refused.

Example:
    >>> import torch
    >>> from lmech.stopping import EvidenceStopping
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
    >>> driver = StoppingDriver(EvidenceStopping(patience=1), net, torch.nn.functional.mse_loss, (x, y))
    >>> sorted(driver.observe(10))
    ['eb', 'gate_fraction', 'loss', 'mean_gsnr']
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from lmech.errors import ConfigError
from lmech.stopping.base import StoppingCriterion
from lmech.stopping.channel_noise import channel_noise_signals
from lmech.stopping.signals import gradient_signals

__all__ = ["StoppingDriver", "GRADIENT_SIGNALS", "PATH_SIGNALS"]

GRADIENT_SIGNALS = ("loss", "gate_fraction", "eb", "mean_gsnr")
PATH_SIGNALS = ("poprisk_loo", "poprisk_gcv", "channel_noise_risk")


class StoppingDriver:
    """Feed ``criterion`` from ``batch``/``loss_fn`` and/or a path recorder (module docstring).

    Args:
        criterion: the rule.
        model: the trained network.
        loss_fn: ``loss_fn(outputs, targets)`` for the gradient signals.
        batch: ``(inputs, targets)`` of training examples for the gradient signals.
        recorder: ``() -> PathRecorder`` on the training set, built on :meth:`start` (only for the
            path signals, so a rule that does not need it costs nothing).
        batch_indices: ``() -> Tensor | None``, the indices into the recorder's training set of the
            minibatch of the step just taken (``None``: full batch).
        rule: the label recorded in the run (default: the criterion's name).
    """

    def __init__(self, criterion: StoppingCriterion, model: nn.Module, loss_fn: Callable | None = None,
                 batch: tuple | None = None, recorder: Callable[[], object] | None = None,
                 batch_indices: Callable[[], Tensor | None] | None = None, rule: str | None = None):
        if not isinstance(criterion, StoppingCriterion):
            raise ConfigError(f"criterion must be an lmech.stopping criterion, got {type(criterion).__name__}")
        if criterion.uses_heldout:
            raise ConfigError(f"{criterion.name} reads held-out data; a validation-free loop feeds training "
                              "signals only (score a run against the oracle afterwards with lmech.stopping.oracle_step)")
        unknown = [k for k in criterion.needs if k not in GRADIENT_SIGNALS + PATH_SIGNALS]
        if unknown:
            raise ConfigError(f"{criterion.name} needs {unknown}, which no training-data source here measures")
        self.criterion, self.model, self.loss_fn, self.batch = criterion, model, loss_fn, batch
        self.rule = rule or criterion.name
        self.uses_gradients = any(k in GRADIENT_SIGNALS for k in criterion.needs)
        self.uses_path = any(k in PATH_SIGNALS for k in criterion.needs)
        if self.uses_gradients and (batch is None or loss_fn is None):
            raise ConfigError(f"{self.rule} needs batch=(inputs, targets) and loss_fn for its gradient signals")
        if self.uses_path and recorder is None:
            raise ConfigError(f"{self.rule} needs a path recorder on the training set (recorder=)")
        self._make_recorder, self._batch_indices = recorder, batch_indices
        self.recorder = None
        self._path: dict = {}

    def start(self) -> None:
        """Before the first optimizer step: start the path recorder at the initial weights."""
        self.criterion.reset()
        if self.uses_path:
            self.recorder = self._make_recorder()
            self.recorder.start()

    def after_step(self) -> None:
        """After each optimizer step: advance the path recorder over it (no-op without one)."""
        if self.recorder is not None:
            batch = None if self._batch_indices is None else self._batch_indices()
            self._path = self.recorder.step(batch=batch)

    def signals(self) -> dict[str, float]:
        """The signals ``criterion.needs`` calls for, at the current weights."""
        out: dict[str, float] = {}
        if self.uses_gradients:
            out.update(gradient_signals(self.model, self.loss_fn, *self.batch))
        if self.uses_path:
            out.update({k: self._path[k] for k in ("poprisk_loo", "poprisk_gcv", "leverage") if k in self._path})
            if "channel_noise_risk" in self.criterion.needs:
                out.update(channel_noise_signals(self.recorder))
        return out

    def observe(self, step: int) -> dict[str, float]:
        """Measure and feed one evaluation at ``step``; returns the signals (see :attr:`fired`)."""
        values = self.signals()
        self.criterion.update(step, **values)
        return values

    @property
    def fired(self) -> bool:
        return self.criterion.should_stop

    def decision(self) -> dict:
        """``stop/rule``, ``stop/step`` (the step the rule fired at; ``None`` if it never did) and
        ``stop/best_step`` (the step it selects; the last one fed if it never fired)."""
        c = self.criterion
        return {"stop/rule": self.rule, "stop/step": c.stop_step, "stop/best_step": c.selected_step()}
