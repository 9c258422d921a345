r"""The catalog's training loop: an entry that trains a network declares its model, optimizer,
minibatch loss, evaluation and schedule (a :class:`TrainingLoop`) and :func:`train` runs it, with
the divergence handling, the logging into the run and, on request, a :class:`lmech.Monitor`.

Schedule (what every entry that uses it shares, bit for bit with the loops it replaced)::

    for step in 0 .. steps:
        if eval_at(step):                            # default: step % eval_every == 0 or step == steps
            metrics = evaluate(step)                 # no_grad is the entry's business
            check_finite(metrics[watch])             # DivergedError -> the run reads "diverged" (watch="": none)
            run.log(step, **metrics, **extras())     # e.g. weight norm, optimizer diagnostics
            if on_eval(step, metrics): stop          # the entry's bookkeeping; True stops early
        if step == steps: stop
        loss = loss_fn(step)                         # minibatch loss, training mode
        optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
        scheduler.step()                             # only with a scheduler (learning-rate schedule)
                                                     # or: loss = step_fn(step), the entry's own update
        check_finite(loss)
        run.log(step, **on_step(step, loss))         # optional: e.g. the minibatch loss every k steps
        monitor.step(step + 1, optimizer)            # only with probes != "none"
        stopping.after_step()                        # only with a stopping rule (path recorder)

Instruments: ``probes="none"`` (every entry's default) attaches nothing, so the run computes what
it computed before the key existed (the key is hash-neutral at ``"none"``:
:data:`lmech.runs.provenance.HASH_NEUTRAL`); ``"economy"`` or ``"full"`` attaches a Monitor with that
preset (:mod:`lmech.monitor`) on the entry's probe batch, every ``probe_every`` steps (default:
``eval_every``), writing ``probe/``, ``gradnoise/``, ``weights/``, ``sharpness/``... columns into the
run. The Monitor restores every random generator after measuring, so the training losses do not
change either way (tested). Several loops may train into one run (arms, widths): ``probe_prefix``
puts each loop's probe (and ``stop/``) columns under its own name (``"gd_0.1/"`` + ``"sharpness/lambda_1"``).

Updates other than ``zero_grad; backward; step`` (a closed-form or hand-written update, one that
is skipped on a non-finite loss) are the entry's ``step_fn``: it makes the whole update of step
``step`` and returns its loss; the loop keeps the schedule, the divergence check and the Monitor.
A full-batch loop whose evaluation and update share one forward pass wraps it in
:class:`OncePerStep`. ``eval_at=never, evaluate=no_evaluation`` trains without logging, for
entries that measure only before and after (or log in ``on_step``: :func:`log_minibatch_loss`).

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
        watch: the key of ``evaluate``'s metrics that must stay finite (else the run diverged); ``""``
            for an evaluation without metrics of its own (``no_evaluation`` fed to a stopping rule).
        extras: ``() -> dict`` logged beside every evaluation (weight norm, optimizer diagnostics).
        on_eval: ``(step, metrics) -> bool | None``, called after each evaluation is logged; a true
            return value stops training there (e.g. a target reached).
        probes: ``"none"``, ``"economy"`` or ``"full"`` (a Monitor preset).
        probe_batch: ``(inputs, targets)`` the Monitor measures on (needed unless ``probes="none"``).
        probe_loss: ``loss_fn(outputs, targets)`` for the Monitor's probes.
        probe_every: Monitor interval in steps (default ``eval_every``).
        eval_at: ``step -> bool``, which steps are evaluated (after that many updates), for schedules
            other than every ``eval_every`` steps and the last (e.g. geometrically spaced steps).
        step_fn: ``step -> Tensor | float``: the entry's own update of step ``step`` (in place of
            ``zero_grad; loss(step).backward(); optimizer.step()``), returning the step's loss;
            ``loss`` and ``optimizer`` may then be ``None``.
        on_step: ``(step, loss) -> dict | None``, called after the update of step ``step`` with its
            loss (a float); a returned dict is logged at ``step`` (e.g. the minibatch loss every
            ``k`` steps, as logged by the loops this replaced).
        probe_prefix: prepended to the Monitor's and the stopping rule's column names (several loops
            in one run).
        scheduler: a learning-rate scheduler, stepped after every ``optimizer.step()`` (with a
            ``step_fn``, stepping it is the entry's business).
        stopped_at: set by :func:`train`: the step training ended at (``steps``, or earlier).
        stopping: a :class:`lmech.stopping.driver.StoppingDriver` (module docstring), or ``None``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    steps: int
    eval_every: int
    loss: Callable[[int], Tensor] | None
    evaluate: Callable[[int], dict]
    watch: str
    extras: Callable[[], dict] = _no_extras
    on_eval: Callable[[int, dict], Any] | None = None
    probes: ProbeLevel = "none"
    probe_batch: tuple | None = None
    probe_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    probe_every: int | None = None
    eval_at: Callable[[int], bool] | None = None
    step_fn: Callable[[int], Tensor | float] | None = None
    on_step: Callable[[int, float], dict | None] | None = None
    probe_prefix: str = ""
    scheduler: Any = None
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

        sink = _PrefixedSink(run, self.probe_prefix) if self.probe_prefix else run
        return Monitor(self.model, self.probe_loss, self.probe_batch, probes=self.probes,
                       every=self.probe_every or self.eval_every, sinks=[sink])

    def update(self, step: int) -> float:
        """Make the update of step ``step`` (``step_fn``, or the optimizer on ``loss``); its loss."""
        if self.step_fn is not None:
            loss = self.step_fn(step)
            return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        loss = self.loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach())


class _PrefixedSink:
    """A run seen by a Monitor under a column prefix: ``prefix + name`` for scalars and arrays."""

    def __init__(self, run, prefix: str):
        from lmech.monitor import RunSink

        self.sink, self.prefix = RunSink(run), prefix

    def write(self, step: int, metrics: dict) -> None:
        self.sink.write(step, {self.prefix + k: v for k, v in metrics.items()})

    def close(self) -> None:
        self.sink.close()


class OncePerStep:
    """``fn(step)`` computed once per step and shared: a full-batch loop's evaluation and update
    use the same forward pass (``evaluate`` reads it first, ``loss`` then gets the same tensors,
    graph attached), as the loops this replaced did with one forward per step.

    Example:
        >>> calls = []
        >>> shared = OncePerStep(lambda step: calls.append(step) or step * 2)
        >>> shared(3), shared(3), shared(4), calls
        (6, 6, 8, [3, 4])
    """

    def __init__(self, fn: Callable[[int], Any]):
        self.fn, self.step, self.value = fn, None, None

    def __call__(self, step: int) -> Any:
        if self.step != step:
            self.step, self.value = step, self.fn(step)
        return self.value


def never(step: int) -> bool:
    """``eval_at`` of a loop that evaluates nothing while it trains (it measures before and after)."""
    return False


def no_evaluation(step: int) -> dict:
    """``evaluate`` of a loop that evaluates nothing while it trains (with ``eval_at=never``)."""
    return {}


def log_minibatch_loss(name: str, every: int, steps: int) -> Callable[[int, float], dict | None]:
    """``on_step`` logging the minibatch loss as ``name`` every ``every`` steps and at the last,
    ``steps - 1`` (at the step whose loss it is, after its update)."""
    def on_step(step: int, loss: float) -> dict | None:
        return {name: loss} if step % every == 0 or step == steps - 1 else None
    return on_step


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
                if loop.watch:
                    check_finite(evals[loop.watch], step, last_good)
                signals = _stop_signals(stopping, step, loop.probe_prefix)
                run.log(step, **evals, **loop.extras(), **signals)
                stop = loop.on_eval is not None and loop.on_eval(step, evals)
                if stop or (stopping is not None and stopping.fired):
                    break
            if step == loop.steps:
                break
            loss = loop.update(step)
            check_finite(loss, step + 1, last_good)
            last_good = step + 1
            if loop.on_step is not None:
                logged = loop.on_step(step, loss)
                if logged:
                    run.log(step, **logged)
            if monitor is not None:
                monitor.step(step + 1, optimizer=loop.optimizer)
            if stopping is not None:
                stopping.after_step()
    finally:
        if monitor is not None:
            monitor.close()
    loop.stopped_at = step
    return evals


def _stop_signals(stopping, step: int, prefix: str = "") -> dict:
    """Feed the rule at an evaluation after step 0; its signals as ``<prefix>stop/`` columns, and
    the decision at the step it fires."""
    if stopping is None or step == 0:
        return {}
    out = {f"{prefix}stop/{k}": v for k, v in stopping.observe(step).items()}
    if stopping.fired:
        decision = stopping.decision()
        out.update({f"{prefix}stop/step": decision["stop/step"], f"{prefix}stop/best_step": decision["stop/best_step"]})
    return out


__all__ = ["PROBE_LEVELS", "OncePerStep", "ProbeLevel", "TrainingLoop", "log_minibatch_loss", "never", "no_evaluation",
           "train"]
