r"""The catalog's training loop: an entry that trains a network declares its model, optimizer,
minibatch loss, evaluation and schedule (a :class:`TrainingLoop`) and :func:`train` runs it, with
the divergence handling, the logging into the run and, on request, a :class:`lmech.Monitor`.

Schedule (what every entry that uses it shares, bit for bit with the loops it replaced)::

    for step in 0 .. steps:
        if eval_at(step):                            # default: step % eval_every == 0 or step == steps
            metrics = evaluate(step)                 # no_grad is the entry's business
            check_finite(metrics[watch])             # DivergedError -> the run reads "diverged"
            run.log(step, **metrics, **extras())     # e.g. weight norm, optimizer diagnostics
            if on_eval(step, metrics): stop          # the entry's bookkeeping; True stops early
        if step == steps: stop
        loss = loss_fn(step)                         # minibatch loss, training mode
        optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
        check_finite(loss)
        monitor.step(step + 1, optimizer)            # only with probes != "none"
        stopping.after_step()                        # only with a stopping rule (path recorder)

Instruments: ``probes="none"`` (every entry's default) attaches nothing, so the run computes what
it computed before the key existed (the key is hash-neutral at ``"none"``:
:data:`lmech.runs.provenance.HASH_NEUTRAL`); ``"economy"`` or ``"full"`` attaches a Monitor with that
preset (:mod:`lmech.monitor`) on the entry's probe batch, every ``probe_every`` steps (default:
``eval_every``), writing ``probe/``, ``gradnoise/``, ``weights/``, ``sharpness/``... columns into the
run. The Monitor restores every random generator after measuring, so the training losses do not
change either way (tested).

Early stopping: ``stopping=None`` (the default) changes nothing. A
:class:`lmech.stopping.driver.StoppingDriver` is fed at every evaluation after step 0 with the
validation-free signals its rule needs (measured on training data only, logged as ``stop/<signal>``
columns); when the rule fires, that evaluation is the last one: it is logged with ``stop/step`` and
``stop/best_step`` and training ends there. :meth:`TrainingLoop.stop_result` gives the decision for
the entry's result (``{}`` without a rule). The measurements draw no random numbers and restore the
model's mode, so the metrics up to the stopping step are those of the run without a rule (tested).

Example:
    >>> import torch
    >>> from lmech.runs import RunStore
    >>> import tempfile
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> loop = TrainingLoop(net, opt, steps=20, eval_every=10,
    ...                     loss=lambda step: (net(x) - y).square().mean(),
    ...                     evaluate=lambda step: {"train_mse": float((net(x) - y).square().mean().detach())},
    ...                     watch="train_mse")
    >>> with RunStore(tempfile.mkdtemp()).create("doc", {}, 0) as run:
    ...     last = train(run, loop)
    >>> sorted(last)
    ['train_mse']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from lmech.train import check_finite

ProbeLevel = Literal["none", "economy", "full"]
PROBE_LEVELS = ("none", "economy", "full")


def _no_extras() -> dict:
    return {}


@dataclass
class TrainingLoop:
    """What an entry declares; :func:`train` runs it (module docstring for the schedule).

    Attributes:
        model, optimizer: the network and its optimizer.
        steps: optimizer steps; ``eval_every``: evaluation interval (the last step is always evaluated).
        loss: ``step -> Tensor``, the minibatch training loss of step ``step`` (graph attached).
        evaluate: ``step -> {name: float}``, the metrics logged at an evaluation step.
        watch: the key of ``evaluate``'s metrics that must stay finite (else the run diverged).
        extras: ``() -> dict`` logged beside every evaluation (weight norm, optimizer diagnostics).
        on_eval: ``(step, metrics) -> bool | None``, called after each evaluation is logged; a true
            return value stops training there (e.g. a target reached).
        probes: ``"none"``, ``"economy"`` or ``"full"`` (a Monitor preset).
        probe_batch: ``(inputs, targets)`` the Monitor measures on (needed unless ``probes="none"``).
        probe_loss: ``loss_fn(outputs, targets)`` for the Monitor's probes.
        probe_every: Monitor interval in steps (default ``eval_every``).
        eval_at: ``step -> bool``, which steps are evaluated (after that many updates), for schedules
            other than every ``eval_every`` steps and the last (e.g. geometrically spaced steps).
        stopped_at: set by :func:`train`: the step training ended at (``steps``, or earlier).
        stopping: a :class:`lmech.stopping.driver.StoppingDriver` (module docstring), or ``None``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    eval_every: int
    loss: Callable[[int], Tensor]
    evaluate: Callable[[int], dict]
    watch: str
    extras: Callable[[], dict] = _no_extras
    on_eval: Callable[[int, dict], Any] | None = None
    probes: ProbeLevel = "none"
    probe_batch: tuple | None = None
    probe_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    probe_every: int | None = None
    eval_at: Callable[[int], bool] | None = None
    stopped_at: int | None = None
    stopping: Any = None

    def stop_result(self) -> dict:
        """The stopping decision for the entry's result (``stop/rule``, ``stop/step``,
        ``stop/best_step``); ``{}`` without a stopping rule, so results are as before."""
        return {} if self.stopping is None else self.stopping.decision()

    def monitor(self, run):
        """The Monitor of ``probes`` writing into ``run`` (``None`` for ``"none"``)."""
        if self.probes == "none":
            return None
        if self.probes not in PROBE_LEVELS:
            raise ValueError(f"probes must be one of {', '.join(PROBE_LEVELS)}, got {self.probes!r}")
        if self.probe_batch is None or self.probe_loss is None:
            raise ValueError("probes need probe_batch=(inputs, targets) and probe_loss=loss_fn")
        from lmech.monitor import Monitor

        return Monitor(self.model, self.probe_loss, self.probe_batch, probes=self.probes,
                       every=self.probe_every or self.eval_every, sinks=[run])


def train(run, loop: TrainingLoop) -> dict:
    """Run ``loop`` into ``run``; returns the metrics of the last evaluation (the final step's)."""
    monitor = loop.monitor(run)
    stopping = loop.stopping
    if stopping is not None:
        stopping.start()
    last_good, evals = 0, {}
    try:
        for step in range(loop.steps + 1):
            due = (step % loop.eval_every == 0 or step == loop.steps) if loop.eval_at is None else loop.eval_at(step)
            if due:
                evals = loop.evaluate(step)
                check_finite(evals[loop.watch], step, last_good)
                signals = _stop_signals(stopping, step)
                run.log(step, **evals, **loop.extras(), **signals)
                stop = loop.on_eval is not None and loop.on_eval(step, evals)
                if stop or (stopping is not None and stopping.fired):
                    break
            if step == loop.steps:
                break
            loss = loop.loss(step)
            loop.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loop.optimizer.step()
            check_finite(float(loss.detach()), step + 1, last_good)
            last_good = step + 1
            if monitor is not None:
                monitor.step(step + 1, optimizer=loop.optimizer)
            if stopping is not None:
                stopping.after_step()
    finally:
        if monitor is not None:
            monitor.close()
    loop.stopped_at = step
    return evals


def _stop_signals(stopping, step: int) -> dict:
    """Feed the rule at an evaluation after step 0; its signals as ``stop/`` columns, and the
    decision at the step it fires."""
    if stopping is None or step == 0:
        return {}
    out = {f"stop/{k}": v for k, v in stopping.observe(step).items()}
    if stopping.fired:
        decision = stopping.decision()
        out.update({"stop/step": decision["stop/step"], "stop/best_step": decision["stop/best_step"]})
    return out


__all__ = ["PROBE_LEVELS", "ProbeLevel", "TrainingLoop", "train"]
