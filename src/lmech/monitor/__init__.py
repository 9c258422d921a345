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
spun on the second core while training went on (``benchmarks/monitor_overhead.py``; figures in
docs/results/probes.md, "BLAS threads").

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
    reached (some eigenvalue lies within it). Its HVPs per measurement and actual error against
    a converged Lanczos (``benchmarks/economy_sharpness_accuracy.py``) are in
    docs/results/probes.md. When the top eigenvector turns almost orthogonal to the previous one
    between measurements, the warm-started iteration returns the next eigenvalue instead (at
    every tolerance).

  Cost: ``benchmarks/monitor_overhead.py --repeats 9`` measures it per probe and as a share of
  training time (figures in docs/results/probes.md, "Monitor overhead"). Sharpness is the
  floor: its gradient with ``create_graph`` and its HVPs are matrix products on 64 examples.

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
  top eigenvalue of the Hessian of ``B/4`` examples (larger than the full-batch one when
  examples disagree), and the noise statistics have the standard errors of ``min(32, B)``
  examples (``gradnoise/snr_stderr``). docs/results/probes.md has the measurements.
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

The package, one concept a file: :mod:`lmech.monitor.monitor` (the :class:`Monitor`),
:mod:`lmech.monitor.presets` (:class:`LossProbe` and the presets), :mod:`lmech.monitor.sinks` (the
:class:`Sink` protocol; memory, run store, TensorBoard) and :mod:`lmech.monitor.trackers` (W&B and
MLflow, each importing its package only when a sink is built). Every name is reached from here.
"""

from lmech.monitor.monitor import Monitor
from lmech.monitor.presets import PRESETS, LossProbe, preset
from lmech.monitor.sinks import ListSink, RunSink, Sink, TensorBoardSink, split_metrics
from lmech.monitor.trackers import MLflowSink, WandbSink

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

# doctest.testmod(lmech.monitor) runs the Monitor's example, defined in lmech.monitor.monitor
__test__ = {"Monitor": Monitor}
