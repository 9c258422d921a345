r"""Attach instruments to any training loop: :class:`Monitor` runs probes on a fixed probe batch on
a schedule, within a memory budget, and writes what they measure to sinks.

.. code-block:: python

    from lmech import Monitor
    from lmech.runs import RunStore

    with RunStore("runs").create("my-experiment", config, seed=0) as run, \
            Monitor(model, loss_fn, (x_probe, y_probe), probes="economy", every=100,
                    budget_mb=512, sinks=[run]) as monitor:
        for step in range(steps):
            ...                               # forward, backward, optimizer.step()
            monitor.step(step, optimizer=opt) # measures when step % every == 0

Leaving the ``with`` blocks closes the sinks and marks the run done (failed on an exception). The
run store flushes buffered metrics every few seconds while metrics arrive and at interpreter exit,
so a loop that never closes its run loses nothing (the run then reads ``incomplete``).

Guarantees (tested): during a measurement every module is put in ``eval()`` mode and its
``training`` flag restored afterwards; parameters, buffers, ``.grad`` fields and the optimizer
state are only read; the torch (CPU and CUDA), NumPy and Python ``random`` generator states are
saved before and restored after, so a run with a Monitor attached produces the same losses, bit
for bit, as the same run without it. A measurement runs with ``torch.autocast`` switched off (the
probes measure the float32 model of an autocast run: :mod:`lmech.probes.precision`), and a call of
:meth:`Monitor.step` off the schedule does no tensor work at all (no host synchronisation on a
GPU). During a measurement NumPy's BLAS (the small LAPACK solves
inside Lanczos) runs on at most ``torch.get_num_threads()`` threads (``threadpoolctl``): a run
limited to one thread stays on one core (:func:`lmech.core.threads.blas_threads`). Without the
limit OpenBLAS started a thread pool on the first eigensolve of size 60 or more, whose threads then
spun on the second core while training went on (``benchmarks/monitor_overhead.py``: process CPU
time 22-24% above the plain run's, wall time 12-15% above).

Presets (``probes=``):

* ``"economy"`` — meant to run every 100 steps. Per measurement it computes:

  - ``probe/``: the loss (and accuracy) on the whole probe batch, one forward pass;
  - ``gradnoise/``: gradient noise on the first 32 examples: SNR, mean GSNR, gate fraction,
    signal, noise scale with jackknife standard errors, globally and per layer. On a model
    whose parameters all sit in ``nn.Linear`` layers (an MLP) from one forward and backward pass
    by the outer-product structure of their gradients (:func:`lmech.probes.grad_noise`,
    ``method="linear"``); otherwise from the ``vmap`` per-example gradients (32 x P numbers);
  - ``weights/``: per weight matrix the spectral norm (exact through the Gram matrix when a
    side is at most 64, otherwise Lanczos on :math:`W^\top W` to a certified relative residual
    of 1e-3, warm-started from the previous measurement's singular vector), stable rank, and the
    Frobenius and spectral relative change from the first measurement; no SVD, no tail fit;
  - ``sharpness/``: the top Hessian eigenvalue on the first 64 examples, one gradient with
    ``create_graph`` plus at most 4 HVPs (Lanczos to a certified relative residual of 5e-2),
    warm-started from the previous measurement's eigenvector (the first from the gradient), so
    the iteration continues across measurements; ``sharpness/rel_error`` is the certified bound
    reached (some eigenvalue lies within it). Measured on the benchmark's MLP over 3,000 AdamW
    steps against a converged Lanczos (``benchmarks/economy_sharpness_accuracy.py``): 2.9 HVPs
    per measurement, median actual error 1.5e-3 (3.8 HVPs and 1.5e-4 at a residual of 2e-2).
    When the top eigenvector turns almost orthogonal to the previous one between measurements
    (once, early in that run), the warm-started iteration returns the next eigenvalue instead
    (15% low there, at every tolerance tried).

  Cost (``benchmarks/monitor_overhead.py --repeats 9``: MLP 40-256-256-10, AdamW, batch 128,
  CPU, one thread, a training step about 1.0 ms): about 9.6 ms per measurement (sharpness
  3.7, gradient noise 2.5, weights 2.0, loss 0.6), 9.5% of training time at ``every=100``
  within runs, 9.2% after the first measurement (which holds one-time setup); the first
  training step after a measurement runs about 0.3 ms slower (caches refilled). Sharpness is the
  floor: each HVP on 64 examples is about 1 ms of matrix products. docs/results/probes.md has
  the measurements.

  *Sized by the training batch* (``preset("economy", train_batch=B)``, ``B`` examples per
  training step): the fixed 32 and 64 examples above cost in proportion to the probe batch, not
  to training, so a model trained on a few long sequences pays many training steps per
  measurement. Given ``B``, gradient noise uses the first :math:`\min(32, B)` examples (at least
  3) and sharpness the first :math:`\min(64, \lfloor B/4 \rfloor)` (at least 1). Cost model, in
  training steps (one forward and backward of ``B`` examples): per-example gradients of at most
  ``B`` examples cost about one to three steps (``vmap`` overhead), sharpness (a ``create_graph``
  gradient plus at most 4 HVPs, each about two gradients) about ten gradients of ``B/4``
  examples, i.e. about 2.5 steps, the weights probe does not grow with the data; with the probe
  loss (one forward pass of the probe batch: about a third of a step per ``B`` examples) a
  measurement is a handful of training steps (more with a probe batch many times ``B``), under
  10% of training time amortized at ``every=100``. The price is statistical: sharpness is the
  top eigenvalue of the Hessian of ``B/4`` examples (larger than the full-batch one when examples disagree), and the noise
  statistics have the standard errors of ``min(32, B)`` examples (``gradnoise/snr_stderr``).
  docs/results/probes.md has the measurements.
* ``"full"`` — everything: top-3 Hessian eigenvalues (Adam-preconditioned too when an Adam-type
  optimizer is passed to :meth:`Monitor.step`) with per-layer values, Hessian trace and spectral
  density, the NTK on 64 examples with per-layer traces and drift, gradient noise with per-layer
  values, weight spectra with power-law fits and singular values, and representation change.

Several processes (``torch.distributed``; docs/results/distributed.md). Built on every rank of an
initialized process group (detected, or ``group=``), with the ``DistributedDataParallel`` wrapper
or its ``.module``, the Monitor treats the ranks' probe batches as one global batch, their
concatenation in rank order: the loss and gradient noise combine per-rank sums (one all-reduce,
one all-gather), sharpness, trace and spectral density all-reduce their Hessian-vector products
(computed on ``.module`` with ``functional_call``: DDP's hooks do not support double backward),
subsamples ("the first 32 examples") are taken from the global batch, and probes that do not
combine shards themselves (NTK, representations, ``GramianProbe``, user probes without
``shards = True``) run on the global batch gathered once. Every rank returns the same metrics
(timings are rank 0's); only rank 0 writes to the sinks; a probe that fails on one rank raises on
every rank (``CollectiveError`` on the others, within about ``timeout_s``). Under FSDP2
(``fully_shard``) only :class:`LossProbe` runs; other probes are refused at construction.

Metric names are ``"<probe>/<metric>"`` (e.g. ``"sharpness/lambda_1"``,
``"gradnoise/snr/layers.0"``), plus ``"<probe>/seconds"``, the wall time of that probe.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from lmech.core.distributed import DEFAULT_TIMEOUT_S, CollectiveError, is_fsdp, resolve, unwrap
from lmech.core.batch import Output, adapt
from lmech.core.functional import ParamSelector
from lmech.core.threads import blas_threads
from lmech.probes.base import Cost, Probe, TrainState, split_batch
from lmech.probes.precision import full_precision

__all__ = [
    "Monitor",
    "LossProbe",
    "preset",
    "PRESETS",
    "Sink",
    "ListSink",
    "RunSink",
    "TensorBoardSink",
    "WandbSink",
    "MLflowSink",
    "split_metrics",
]

PRESETS = ("economy", "full")


class LossProbe:
    r"""Monitor probe: ``loss`` of the model on the probe batch (and ``accuracy`` for integer
    targets with outputs ``(n, classes)``), in eval mode.

    Several processes: the global-batch values, :math:`\sum_r n_r L_r / N` (``loss_fn`` a mean
    over examples) and the fraction of correct predictions over all :math:`N` examples, from one
    all-reduce of each rank's weighted sums."""

    name = "probe"
    cost: Cost = "low"
    shards = True

    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        inputs, targets = split_batch(state.batch)
        n = inputs[0].shape[0]
        with torch.no_grad():
            out = state.model(*inputs)
            loss = state.loss_fn(out, targets).detach().to(torch.float64)
            has_accuracy = (isinstance(targets, Tensor) and not targets.is_floating_point()
                            and isinstance(out, Tensor) and out.dim() == targets.dim() + 1)
            correct = (out.argmax(-1) == targets).double().sum() if has_accuracy else torch.zeros((), dtype=torch.float64)
        if state.dist is None:
            metrics = {"loss": float(loss)}
            if has_accuracy:
                metrics["accuracy"] = float(correct / targets.numel())
            return metrics
        d = state.dist
        count = targets.numel() if isinstance(targets, Tensor) else n
        parts = torch.stack([loss * n if n else loss.new_zeros(()), correct.cpu().to(torch.float64),
                             torch.tensor(float(n), dtype=torch.float64), torch.tensor(float(count), dtype=torch.float64)])
        total_loss, total_correct, total_n, total_count = d.sum(parts.cpu()).tolist()
        metrics = {"loss": total_loss / total_n}
        if has_accuracy:
            metrics["accuracy"] = total_correct / total_count
        return metrics


def preset(name: Literal["economy", "full"], *, train_batch: int | None = None) -> list[Probe]:
    """The probe list of a preset (module docstring); fresh objects each call.

    ``train_batch``: the number of examples in one training step. Given, the economy preset sizes
    its samples by it instead of the fixed 32 and 64 examples (module docstring, "sized by the
    training batch"): ``Monitor(model, loss_fn, batch, probes=preset("economy", train_batch=8))``.
    """
    from lmech.probes.gradnoise import GradNoiseProbe
    from lmech.probes.ntk import NTKProbe
    from lmech.probes.representations import RepresentationProbe
    from lmech.probes.sharpness import HessianTraceProbe, SharpnessProbe, SpectralDensityProbe
    from lmech.probes.weights import WeightSpectrumProbe

    if train_batch is not None and not (isinstance(train_batch, int) and train_batch >= 1):
        raise ValueError(f"train_batch must be a positive number of examples, got {train_batch!r}")
    if name == "economy":
        noise, curvature = (32, 64) if train_batch is None else (max(3, min(32, train_batch)),
                                                                 max(1, min(64, train_batch // 4)))
        return [LossProbe(), GradNoiseProbe(per_layer=True, num_examples=noise),
                WeightSpectrumProbe(fit_power_law=False, tol=1e-3),
                SharpnessProbe(k=1, tol=5e-2, max_iter=4, num_examples=curvature)]
    if name == "full":
        return [LossProbe(), SharpnessProbe(k=3, preconditioned="auto", per_layer=True),
                HessianTraceProbe(num_matvecs=30), SpectralDensityProbe(),
                NTKProbe(num_examples=64, per_layer=True), GradNoiseProbe(per_layer=True),
                WeightSpectrumProbe(fit_power_law=True, singular_values=True), RepresentationProbe()]
    raise ValueError(f"unknown probe preset {name!r}; use one of {', '.join(PRESETS)} or a list of probes")


# --------------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """Where measurements go: ``write(step, metrics)`` with floats and tensors; ``close()``."""

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None: ...

    def close(self) -> None: ...


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``(scalars, arrays)``: one-element values as floats, spectra and other arrays as tensors."""
    scalars, arrays = {}, {}
    for k, v in metrics.items():
        if isinstance(v, Tensor) and v.numel() != 1:
            arrays[k] = v
        elif isinstance(v, np.ndarray) and v.size != 1:
            arrays[k] = torch.as_tensor(v)
        else:
            scalars[k] = float(v)
    return scalars, arrays


_split = split_metrics


class ListSink:
    """Keeps every measurement in memory: ``records`` is a list of ``(step, metrics)``;
    :meth:`scalars` gives a wide DataFrame (one row per step, one column per scalar metric)."""

    def __init__(self):
        self.records: list[tuple[int, dict[str, float | Tensor]]] = []

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        self.records.append((int(step), dict(metrics)))

    def scalars(self):
        import pandas as pd

        rows = [{"step": s, **_split(m)[0]} for s, m in self.records]
        return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()

    def close(self) -> None:
        pass


class RunSink:
    """Writes to an lmech run (:class:`lmech.runs.store.Run`): scalars with ``run.log``, arrays
    (spectra) with ``run.log_array``. The run is not finished by :meth:`close` (its ``with``
    block owns it)."""

    def __init__(self, run):
        if not (hasattr(run, "log") and hasattr(run, "log_array")):
            raise TypeError(f"RunSink needs an lmech Run (with log and log_array), got {type(run).__name__}")
        self.run = run

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        scalars, arrays = _split(metrics)
        if scalars:
            self.run.log(step, **scalars)
        for name, values in arrays.items():
            self.run.log_array(step, name, values)

    def close(self) -> None:
        self.run.flush()


class TensorBoardSink:
    """Writes to TensorBoard event files (extra ``lmech[tensorboard]``): scalars with
    ``add_scalar``, arrays as histograms. Give ``log_dir`` or an existing ``SummaryWriter``."""

    def __init__(self, log_dir: str | None = None, writer=None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                raise ImportError("TensorBoardSink needs the tensorboard package: "
                                  "pip install 'lmech[tensorboard]'") from e
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        scalars, arrays = _split(metrics)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        for name, values in arrays.items():
            finite = values.detach().reshape(-1).to(torch.float64)
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                self.writer.add_histogram(name, finite, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _as_sink(s) -> Sink:
    if isinstance(s, Sink):
        return s
    if hasattr(s, "log") and hasattr(s, "log_array"):
        return RunSink(s)
    raise TypeError(f"a sink needs write(step, metrics) and close(), or be an lmech Run; got {type(s).__name__}")


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------


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


def __getattr__(name: str):
    # the tracker sinks live in lmech.integrations.trackers and import their package when built
    if name in ("WandbSink", "MLflowSink"):
        from lmech.integrations import trackers

        return getattr(trackers, name)
    raise AttributeError(f"module 'lmech.monitor' has no attribute {name!r}")
