"""Cost of one recorded step of lmech.probes.gramian.PathRecorder, measured in one process.

    python benchmarks/gramian_cost.py [--threads 1] [--n 256] [--m 256] [--width 300] [--reps 7]
                                      [--optimizer sgd|adam] [--every 1]

Model: an MLP 40 -> width -> width -> 1 (``--width 300``: 103k parameters), float32, full-batch
training on |S| = ``--n`` examples, query set |Q| = ``--m``. Reported, as medians over ``--reps``
repetitions: the time of one training step (forward, backward, optimizer step; the baseline), the
time of one ``recorder.step`` and its parts (per-example Jacobians of S and Q, the kernel
contraction [J_S; J_Q] Pi J_S^T, the propagator/Gramian update, the leave-one-out population-risk
estimates), the ratio recorder/training step, the overhead at one record every ``--every`` steps,
the recorder's own memory estimate (:meth:`PathRecorder.memory_estimate`) and the growth of the
process's peak resident memory (VmHWM) during recording. Then the budget: the sizes at which
the default 2 GiB budget refuses (``MemoryBudgetError`` before any allocation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmech.errors import MemoryBudgetError
from lmech.models import MLP
from lmech.probes import gramian
from lmech.probes.gramian import PathRecorder, half_mse


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Timer:
    """Accumulates wall time per label by wrapping functions of the gramian module."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--width", type=int, default=300)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--every", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(40, 1, width=args.width, depth=2)
    n_params = sum(p.numel() for p in model.parameters())
    x, y, xq = torch.randn(args.n, 40), torch.randn(args.n, 1), torch.randn(args.m, 40)
    opt = (torch.optim.SGD(model.parameters(), lr=1e-3) if args.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-4))

    def train_step():
        opt.zero_grad(set_to_none=True)
        half_mse(model(x), y).backward()
        opt.step()

    for _ in range(3):
        train_step()
    base = []
    for _ in range(args.reps):
        t = time.perf_counter()
        train_step()
        base.append(time.perf_counter() - t)

    timer = Timer()
    timer.wrap(gramian, "per_example_jacobian", "jacobians")
    timer.wrap(gramian, "_interval_ops", "propagator")
    timer.wrap(gramian.GramianPath, "advance", "propagator")
    timer.wrap(gramian.GramianPath, "advance_general", "propagator")
    timer.wrap(gramian, "path_loo", "loo")
    rss0 = peak_rss_mib()
    rec = PathRecorder(model, x, y, xq, optimizer=opt)
    rec.start()
    train_step()
    rec.step(1e-3 if args.optimizer == "sgd" else 1e-4, steps=1)       # warm-up
    times, parts = [], []
    for _ in range(args.reps):
        for _ in range(args.every):
            train_step()
        timer.totals.clear()
        t = time.perf_counter()
        rec.step(1e-3 if args.optimizer == "sgd" else 1e-4, steps=args.every)
        times.append(time.perf_counter() - t)
        parts.append(dict(timer.totals))
    t_read = time.perf_counter()
    rec.readout()
    t_read = time.perf_counter() - t_read
    rss1 = peak_rss_mib()

    # reference: the kernel contraction's GEMM alone, same shapes, same process (machine load)
    J_ref, A_ref = torch.randn(args.n + args.m, n_params), torch.randn(args.n, n_params)
    gemm = []
    for _ in range(3):
        t = time.perf_counter()
        J_ref @ A_ref.T
        gemm.append(time.perf_counter() - t)
    del J_ref, A_ref
    gemm_s = statistics.median(gemm)
    flops = 2.0 * (args.n + args.m) * args.n * n_params
    med = statistics.median(times)
    b = statistics.median(base)
    jac = statistics.median(p.get("jacobians", 0.0) for p in parts)
    prop = statistics.median(p.get("propagator", 0.0) for p in parts)
    loo = statistics.median(p.get("loo", 0.0) for p in parts)
    print(f"MLP 40-{args.width}-{args.width}-1: {n_params} parameters, |S| = {args.n}, |Q| = {args.m}, "
          f"{args.optimizer}, every = {args.every}, threads = {args.threads}")
    print(f"training step (baseline)      {1e3 * b:9.1f} ms")
    print(f"recorder.step                 {1e3 * med:9.1f} ms   ratio {med / b:7.1f}x the training step")
    print(f"  per-example Jacobians       {1e3 * jac:9.1f} ms")
    print(f"  propagator / Gramian update {1e3 * prop:9.1f} ms")
    print(f"  leave-one-out estimates     {1e3 * loo:9.1f} ms   (poprisk_loo, poprisk_gcv from D)")
    print(f"  contraction and the rest    {1e3 * (med - jac - prop - loo):9.1f} ms")
    print(f"recording every {args.every} step(s)       {100 * med / (args.every * b):9.1f} % of training time")
    print(f"readout (eigh, coupling, ...) {1e3 * t_read:9.1f} ms")
    print(f"reference GEMM (N+M) x P x N  {1e3 * gemm_s:9.1f} ms   = {flops / gemm_s / 1e9:.1f} GFLOP/s achieved now; "
          f"recorder.step = {med / gemm_s:.1f} such GEMMs")
    print(f"memory estimate               {rec.memory_estimate() / 2**20:9.1f} MiB")
    print(f"peak RSS growth while recording {rss1 - rss0:7.1f} MiB")
    for n in (1024, 4096):
        try:
            PathRecorder(model, torch.randn(n, 40), torch.randn(n, 1), torch.randn(n, 40))
            print(f"|S| = |Q| = {n}: accepted")
        except MemoryBudgetError as err:
            print(f"|S| = |Q| = {n}: refused: {err}")


if __name__ == "__main__":
    main()
