"""The :class:`Monitor`: runs probes on a fixed probe batch on a schedule, within a memory budget,
and writes what they measure to sinks (guarantees and presets: the docstring of :mod:`lmech.monitor`)."""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmech.core.batch import Output, adapt
from lmech.core.distributed import DEFAULT_TIMEOUT_S, CollectiveError, is_fsdp, resolve, unwrap
from lmech.core.functional import ParamSelector
from lmech.core.threads import blas_threads
from lmech.monitor.presets import LossProbe, preset
from lmech.monitor.sinks import ListSink, Sink, _as_sink
from lmech.core.batch import split_batch
from lmech.probes.base import Probe, TrainState
from lmech.probes.precision import full_precision


@dataclass
class _Saved:
    torch_cpu: Tensor
    torch_cuda: list = field(default_factory=list)
    numpy: Any = None
    python: Any = None

    @classmethod
    def capture(cls) -> "_Saved":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


class Monitor:
    r"""Runs probes on a fixed probe batch every ``every`` steps and writes to sinks.

    Args:
        model: the module being trained.
        loss_fn: ``loss_fn(model(*inputs), targets)``, the training loss.
        probe_batch: ``(inputs, targets)`` held fixed for every measurement (a few hundred
            examples is typical; the NTK and representation probes use a subsample).
        probes: ``"economy"``, ``"full"`` (module docstring) or a list of :class:`Probe` objects.
        every: measure when ``step % every == 0``.
        budget_mb: memory budget for any one allocation of a probe (Jacobians, Lanczos bases,
            per-example gradients); above it a probe chunks its work or raises
            :class:`lmech.core.MemoryBudgetError` saying what to shrink.
        sinks: where metrics go: :class:`ListSink`, :class:`RunSink` (or an lmech ``Run``
            directly), :class:`TensorBoardSink`, or anything with ``write``/``close``. Default: one
            :class:`ListSink`, available as :attr:`history`.
        params: parameter selector for the probes' global metrics (default: all trainable).
        on_error: ``"raise"`` (default) or ``"warn"``: a failing probe is skipped for that
            measurement with a one-line warning.
        group: several processes. ``"auto"`` (default): when ``torch.distributed`` is
            initialized with more than one rank, every rank's ``probe_batch`` is its shard of one
            global probe batch (the shards concatenated in rank order) and every metric is that
            of the global batch (section "Several processes" of the module docstring); ``None``:
            each process measures its own batch alone; or a ``ProcessGroup``. All ranks must
            build the Monitor and call :meth:`step` with the same steps.
        timeout_s: collective timeout of a distributed measurement: a rank that fails (or
            stops) makes the others raise :class:`lmech.core.distributed.CollectiveError`
            within about this time instead of waiting forever.
        output: what ``loss_fn`` and the probes see of the model's output: ``None`` (as it is),
            a field name (``"logits"`` of a Hugging Face ``ModelOutput``), an index (a tuple
            output) or a callable.

    ``probe_batch`` may also be a dict (``model(**batch)``, the dict itself passed to
    ``loss_fn`` as the targets, the way Hugging Face collators build batches), and its inputs a
    dict or nested tuples/dicts of tensors, examples along dim 0 (:mod:`lmech.core.batch`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> mon = Monitor(net, nn.functional.cross_entropy, (x, y), probes="economy", every=10)
        >>> metrics = mon.step(0)
        >>> sorted(k for k in metrics if k.startswith("sharpness/"))[:2]
        ['sharpness/hvps', 'sharpness/lambda_1']
        >>> mon.step(5) is None      # not a measurement step
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        probe_batch,
        probes: Sequence[Probe] | Literal["economy", "full"] = "economy",
        every: int = 100,
        budget_mb: float = 512,
        sinks: Iterable | None = None,
        *,
        params: ParamSelector = None,
        on_error: Literal["raise", "warn"] = "raise",
        group="auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        output: Output = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor needs an nn.Module, got {type(model).__name__}")
        model = unwrap(model)  # DDP: probes run on .module (no double backward through DDP's hooks)
        # dict/nested batches and output= handled once (lmech.core.batch); validated now, not at step 100
        self._probe_model, self._probe_batch = adapt(model, probe_batch, output)
        split_batch(self._probe_batch)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if budget_mb is not None and budget_mb <= 0:
            raise ValueError(f"budget_mb must be > 0 (or None for no limit), got {budget_mb}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.probes: list[Probe] = preset(probes) if isinstance(probes, str) else list(probes)
        for p in self.probes:
            if not isinstance(p, Probe):
                raise TypeError(f"{type(p).__name__} is not a probe (needs name, cost, measure(state))")
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ValueError(f"two probes share a name in {names}; give them distinct names")
        if is_fsdp(model):
            for p in self.probes:
                if not isinstance(p, LossProbe):
                    raise ValueError(
                        f"probe {p.name!r} does not run under FSDP2 (fully_shard): its parameters are sharded "
                        "DTensors and its per-example gradients or Hessian products do not go through FSDP's "
                        "hooks; measure under DistributedDataParallel, or use probes=[LossProbe()] here")
        self.dist = resolve(group, timeout_s)
        self._global_batch = None
        self.model, self.loss_fn, self.probe_batch = model, loss_fn, probe_batch
        self.every, self.params, self.on_error = every, params, on_error
        self.max_bytes = None if budget_mb is None else int(budget_mb * 2**20)
        self.sinks: list[Sink] = [ListSink()] if sinks is None else [_as_sink(s) for s in sinks]
        # several processes: only rank 0 writes (every rank returns the same metrics)
        self._writes = self.dist is None or self.dist.rank == 0
        self.history: ListSink | None = next((s for s in self.sinks if isinstance(s, ListSink)), None)
        self.last: dict[str, float | Tensor] | None = None
        self.seconds = 0.0

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Measure (and return the metrics) when ``step % every == 0``; otherwise ``None``."""
        if step % self.every != 0:
            return None
        return self.measure(step, optimizer)

    def measure(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float | Tensor]:
        """Run every probe now, write to the sinks, and return the metrics."""
        start = time.perf_counter()
        rng = _Saved.capture()
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        if self.dist is not None and self.dist.known is None:  # the probe batch's shard sizes, once
            self.dist = self.dist.bound(self.dist.counts(split_batch(self._probe_batch)[0][0].shape[0]))
        state = TrainState(self._probe_model, self.loss_fn, self._probe_batch, int(step), optimizer,
                           self.params, self.max_bytes, dist=self.dist)
        metrics: dict[str, float | Tensor] = {}
        seconds: list[float] = []
        failure: tuple[int, Exception] | None = None  # several processes: (probe index, error)
        try:
            with blas_threads(), full_precision():      # probes measure with autocast off
                for index, probe in enumerate(self.probes):
                    t0 = time.perf_counter()
                    try:
                        values = probe.measure(self._state_for(probe, state))
                    except Exception as e:
                        if self.dist is not None:  # stop here; the ranks agree after the loop
                            failure = (index, e)
                            break
                        if self.on_error == "raise":
                            raise
                        warnings.warn(f"probe {probe.name!r} failed at step {step}: {type(e).__name__}: {e}",
                                      stacklevel=2)
                        continue
                    for key, value in values.items():
                        metrics[f"{probe.name}/{key}"] = value
                    metrics[f"{probe.name}/seconds"] = time.perf_counter() - t0
                    seconds.append(f"{probe.name}/seconds")
        finally:
            for m, was_training in modes:
                m.training = was_training
            rng.restore()
        if self.dist is not None:
            metrics = self._agree(step, metrics, seconds, failure)
        if self._writes:
            for sink in self.sinks:
                sink.write(int(step), metrics)
        self.last = metrics
        self.seconds += time.perf_counter() - start
        return metrics

    def _state_for(self, probe, state: TrainState) -> TrainState:
        """Several processes: a probe that combines the ranks' parts itself (``shards = True``)
        sees this rank's shard; any other probe sees the global batch, gathered once (the probe
        batch is fixed), and computes the same values on every rank."""
        if self.dist is None or getattr(probe, "shards", False):
            return state
        if self._global_batch is None:
            self._global_batch = self.dist.gather_batch(self._probe_batch)
        return TrainState(state.model, state.loss_fn, self._global_batch, state.step, state.optimizer,
                          state.params, state.max_bytes, state.cache, dist=None)

    def _agree(self, step: int, metrics: dict, seconds: list[str], failure) -> dict:
        r"""Several processes: one exchange per measurement on the status group (with the
        timeout): which probe failed first on each rank, and rank 0's timings (so that every rank
        returns the same metrics). A rank whose probe fails stops measuring and comes here; a rank
        that goes on and waits in a collective of the failed probe times out
        (:class:`CollectiveError`) and comes here too. Then every rank raises: its own error, or
        a :class:`CollectiveError` naming the first failed rank and its message; with
        ``on_error="warn"`` every rank warns and keeps only the probes before the failed one."""
        world, rank = self.dist.world_size, self.dist.rank
        try:
            if failure is None:
                # every rank ran every probe: rank 0's timings travel in the same all-reduce
                packet = torch.zeros(world + len(self.probes), dtype=torch.float64)
                if rank == 0:
                    packet[world:] = torch.tensor([metrics[k] for k in seconds], dtype=torch.float64)
            else:
                packet = torch.zeros(world + len(self.probes), dtype=torch.float64)
                packet[rank] = failure[0] + 1
            total = self.dist.sum_status(packet)
        except CollectiveError as e:
            raise (failure[1] if failure is not None else e)
        failed_at = [int(v) - 1 for v in total[:world].tolist()]
        if all(i < 0 for i in failed_at):
            metrics.update(zip(seconds, total[world:].tolist()))
            return metrics
        try:
            messages = self.dist.gather_messages("" if failure is None else f"{type(failure[1]).__name__}: {failure[1]}")
        except CollectiveError as e:
            messages = [str(e)] * world
        first = min(i for i in failed_at if i >= 0)
        culprit = failed_at.index(first)
        name = self.probes[first].name
        error = failure[1] if failure is not None else CollectiveError(
            f"probe {name!r} failed on rank {culprit}: {messages[culprit]}")
        if self.on_error == "raise":
            raise error
        warnings.warn(f"probe {name!r} failed at step {step} on rank {culprit}: {messages[culprit]}; "
                      f"the probes from it on were skipped on every rank", stacklevel=3)
        keep = {p.name for p in self.probes[:first]}
        return {k: v for k, v in metrics.items() if k.split("/", 1)[0] in keep}

    def close(self) -> None:
        """Flush and close every sink (rank 0's only, under several processes)."""
        if not self._writes:
            return
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.probes)
        budget = "none" if self.max_bytes is None else f"{self.max_bytes / 2**20:g} MiB"
        return f"Monitor(probes=[{names}], every={self.every}, budget={budget}, sinks={len(self.sinks)})"


__all__ = ["Monitor"]
