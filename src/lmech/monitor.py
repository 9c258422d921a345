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
for bit, as the same run without it. During a measurement NumPy's BLAS (the small LAPACK solves
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
* ``"full"`` — everything: top-3 Hessian eigenvalues (Adam-preconditioned too when an Adam-type
  optimizer is passed to :meth:`Monitor.step`) with per-layer values, Hessian trace and spectral
  density, the NTK on 64 examples with per-layer traces and drift, gradient noise with per-layer
  values, weight spectra with power-law fits and singular values, and representation change.

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

from lmech.core.batch import Output, adapt
from lmech.core.functional import ParamSelector
from lmech.core.threads import blas_threads
from lmech.probes.base import Cost, Probe, TrainState, split_batch

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
    """Monitor probe: ``loss`` of the model on the probe batch (and ``accuracy`` for integer
    targets with outputs ``(n, classes)``), in eval mode."""

    name = "probe"
    cost: Cost = "low"

    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        inputs, targets = split_batch(state.batch)
        with torch.no_grad():
            out = state.model(*inputs)
            metrics = {"loss": float(state.loss_fn(out, targets))}
            if (isinstance(targets, Tensor) and not targets.is_floating_point()
                    and isinstance(out, Tensor) and out.dim() == targets.dim() + 1):
                metrics["accuracy"] = float((out.argmax(-1) == targets).double().mean())
        return metrics


def preset(name: Literal["economy", "full"]) -> list[Probe]:
    """The probe list of a preset (module docstring); fresh objects each call."""
    from lmech.probes.gradnoise import GradNoiseProbe
    from lmech.probes.ntk import NTKProbe
    from lmech.probes.representations import RepresentationProbe
    from lmech.probes.sharpness import HessianTraceProbe, SharpnessProbe, SpectralDensityProbe
    from lmech.probes.weights import WeightSpectrumProbe

    if name == "economy":
        return [LossProbe(), GradNoiseProbe(per_layer=True, num_examples=32),
                WeightSpectrumProbe(fit_power_law=False, tol=1e-3),
                SharpnessProbe(k=1, tol=5e-2, max_iter=4, num_examples=64)]
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
        output: Output = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor needs an nn.Module, got {type(model).__name__}")
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
        self.model, self.loss_fn, self.probe_batch = model, loss_fn, probe_batch
        self.every, self.params, self.on_error = every, params, on_error
        self.max_bytes = None if budget_mb is None else int(budget_mb * 2**20)
        self.sinks: list[Sink] = [ListSink()] if sinks is None else [_as_sink(s) for s in sinks]
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
        state = TrainState(self._probe_model, self.loss_fn, self._probe_batch, int(step), optimizer,
                           self.params, self.max_bytes)
        metrics: dict[str, float | Tensor] = {}
        try:
            with blas_threads():
                for probe in self.probes:
                    t0 = time.perf_counter()
                    try:
                        values = probe.measure(state)
                    except Exception as e:
                        if self.on_error == "raise":
                            raise
                        warnings.warn(f"probe {probe.name!r} failed at step {step}: {type(e).__name__}: {e}",
                                      stacklevel=2)
                        continue
                    for key, value in values.items():
                        metrics[f"{probe.name}/{key}"] = value
                    metrics[f"{probe.name}/seconds"] = time.perf_counter() - t0
        finally:
            for m, was_training in modes:
                m.training = was_training
            rng.restore()
        for sink in self.sinks:
            sink.write(int(step), metrics)
        self.last = metrics
        self.seconds += time.perf_counter() - start
        return metrics

    def close(self) -> None:
        """Flush and close every sink."""
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
