"""A Monitor under DDP (2 gloo CPU processes, one thread each) against one process on the same
global batch: agreement of every metric, and the time of a measurement.

For each case (model, preset): the global probe batch of ``--examples`` examples is split in two
halves, one per rank; rank 0 also runs a single-process Monitor (``group=None``) on the whole
batch while rank 1 waits at a barrier. The two are interleaved ``--repeats`` times (each arm
measures at steps 0, 1, 2, ... so warm starts behave the same); printed: the largest relative
difference over all metrics (DDP vs one process; float64), the median time of a measurement of
each arm with its range, and the ratio DDP / one process (target <= 1.2).

    python benchmarks/distributed_overhead.py [--examples 256] [--repeats 7] [--dtype float64] [--cases mlp-economy ...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def make_case(name: str, n: int, dtype):
    from lmech.models.cnn1d import CNN1D
    from lmech.models.transformer import Transformer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":  # the Monitor benchmark's MLP
        model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(n, 40, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    elif name == "conv":
        model = CNN1D(in_len=40, n_classes=10, channels=32)
        x = torch.randn(n, 40, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    else:
        model = Transformer(vocab_size=99, seq_len=4, n_out=97, d_model=64, n_heads=4, n_layers=2, d_mlp=256)
        x = torch.randint(0, 99, (n, 4), generator=g)
        y = torch.randint(0, 97, (n,), generator=g)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, F.cross_entropy, (x, y)


CASES = [("mlp", "economy"), ("conv", "economy"), ("transformer", "economy"), ("mlp", "full")]


def rel_diff(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not bool((ok == (torch.isfinite(a) | torch.isfinite(b))).all()):
        return math.inf
    if not bool(ok.any()):
        return 0.0
    scale = torch.maximum(a[ok].abs(), b[ok].abs()).clamp_min(1e-6)
    return float(((a[ok] - b[ok]).abs() / scale).max())


def worker(rank, tmp, args):
    import torch.distributed as dist

    from lmech.monitor import Monitor

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    half = args.examples // 2
    rows = []
    # the latency of one small collective (what a measurement's dozen all-reduces each cost)
    flag = torch.zeros(2, dtype=torch.float64)
    lat = []
    for _ in range(50):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flag)
        lat.append(time.perf_counter() - t0)
    cases = [c for c in CASES if f"{c[0]}-{c[1]}" in args.cases] if args.cases else CASES
    for name, preset in cases:
        model, loss_fn, (x, y) = make_case(name, args.examples, dtype)
        ref_model, _, _ = make_case(name, args.examples, dtype)
        shard = (x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        ddp = Monitor(model, loss_fn, shard, probes=preset, every=1)
        single = Monitor(ref_model, loss_fn, (x, y), probes=preset, every=1, group=None) if rank == 0 else None
        t_ddp, t_single, worst = [], [], 0.0
        for step in range(args.repeats + 1):  # the first measurement (one-time setup) is not timed
            dist.barrier()
            if rank == 0:
                t0 = time.perf_counter()
                ref = single.measure(step)
                t1 = time.perf_counter()
                if step:
                    t_single.append(t1 - t0)
            dist.barrier()
            t0 = time.perf_counter()
            got = ddp.measure(step)
            t1 = time.perf_counter()
            if step:
                t_ddp.append(t1 - t0)
            if rank == 0:
                keys = [k for k in ref if not k.endswith("/seconds")]
                worst = max([worst] + [rel_diff(ref[k], got[k]) for k in keys])
        if rank == 0:
            params = sum(p.numel() for p in model.parameters())
            rows.append((name, preset, params, worst, statistics.median(t_single), min(t_single), max(t_single),
                         statistics.median(t_ddp), min(t_ddp), max(t_ddp)))
    if rank == 0:
        print(f"{args.examples} examples ({half} per rank), {args.dtype}, {args.repeats} interleaved repeats, "
              f"one thread per process; one 2-element all-reduce: median {statistics.median(lat) * 1e3:.2f} ms "
              f"(range {min(lat) * 1e3:.2f}-{max(lat) * 1e3:.2f})")
        print(f"{'model':<12} {'preset':<8} {'params':>8} {'max rel diff':>12} {'one process ms':>20} "
              f"{'DDP 2 procs ms':>20} {'DDP / one':>9}")
        for name, preset, params, worst, ms, lo, hi, md, dlo, dhi in rows:
            print(f"{name:<12} {preset:<8} {params:>8,} {worst:>12.1e} {ms * 1e3:>8.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f})"
                  f" {md * 1e3:>8.1f} ({dlo * 1e3:.1f}-{dhi * 1e3:.1f}) {md / ms:>9.2f}")
    dist.barrier()
    os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--cases", nargs="*", help="e.g. mlp-economy conv-economy (default: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(tmp, args), nprocs=2, start_method="fork")


if __name__ == "__main__":
    main()
