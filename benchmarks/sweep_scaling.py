"""Sweep scaling: 8 short grokking runs on 2 local workers vs 1, and the Ray executor's per-run overhead.

    python benchmarks/sweep_scaling.py                 # 8 runs of 300 steps (a few seconds each, 1 thread)
    python benchmarks/sweep_scaling.py --no-ray        # local executor only

What is measured (all in this one process, each sweep into a fresh temporary store):

* ``T(w)``: wall time of ``run_sweep(..., seeds=8, workers=w)`` with the local executor, after a
  one-run warm-up sweep has started the forkserver (its one-time imports are not charged to
  either arm). Measured in the order T(1), T(2), T(2), T(1) so that a drift in the machine's load
  hits both arms alike; speed-up = (T(1) + T(1)') / (T(2) + T(2)').
* per-run overhead of an executor: the worker-slot seconds a run occupies beyond its own
  ``wall_time_s`` (timed inside ``run_experiment``), i.e. ``(T * workers - sum(wall_time_s)) / runs``.
  It covers process start, run-folder creation, provenance, result hand-back and scheduling.
  For Ray it is measured twice on a local ``ray.init(num_cpus=2)`` instance: the first sweep also
  pays for starting Ray's worker processes and their imports, the second reuses them.

The machine is shared: ``os.getloadavg()`` is printed before and after every measurement.

``--scheduler-check`` only runs a pure-Python loop in 1 and then 2 processes, once with the
processes in this session and once each in its own session (``os.setsid``). With the kernel's
autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``), a session's processes share
one fair slice of the CPU, so on a machine kept busy by other sessions a second process in the
same session gains little; the check shows whether that, not the executor, limits the speed-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lmech.sweeps import run_sweep

CONFIG = {"model": "mlp", "p": 47, "op": "+", "train_fraction": 0.5, "width": 256, "batch_size": 256,
          "eval_every": 100}


def load() -> str:
    return "load avg (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed_sweep(runs: int, workers: int, steps: int, executor: str = "local") -> tuple[float, float]:
    """(wall seconds, summed in-run seconds) of one fresh sweep."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        df = run_sweep("grokking", sets={**CONFIG, "steps": steps}, seeds=runs, executor=executor, workers=workers,
                       out=out, progress=False)
        wall = time.perf_counter() - start
    assert (df["state"] == "done").all(), df[["run_id", "state", "message"]]
    return wall, float(df["wall_time_s"].sum())


def _busy_loop(own_session: bool, task: int) -> float:
    """6M Python additions (``task`` only numbers the pool's tasks)."""
    if own_session and os.getsid(0) != os.getpid():
        os.setsid()  # a new session is a new scheduler autogroup
    start = time.perf_counter()
    total = 0
    for i in range(6_000_000):
        total += i
    return time.perf_counter() - start


def scheduler_check() -> None:
    import functools
    import multiprocessing as mp

    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(f"sched_autogroup_enabled: {autogroup.read_text().strip() if autogroup.exists() else 'n/a'} | {load()}")
    ctx = mp.get_context("fork")
    for own in (False, True):
        job = functools.partial(_busy_loop, own)
        walls = {}
        for procs in (1, 2):
            with ctx.Pool(procs) as pool:
                start = time.perf_counter()
                pool.map(job, [0, 1])
                walls[procs] = time.perf_counter() - start
        label = "each in its own session" if own else "in this session"
        print(f"2 busy loops, processes {label}: 1 process {walls[1]:.2f} s, 2 processes {walls[2]:.2f} s, "
              f"speed-up {walls[1] / walls[2]:.2f}x | {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    parser.add_argument("--scheduler-check", action="store_true", help="only the autogroup check (see above)")
    args = parser.parse_args()
    if args.scheduler_check:
        scheduler_check()
        return
    torch.set_num_threads(1)
    print(f"cpu count {os.cpu_count()}; {args.runs} runs of grokking {CONFIG} steps={args.steps}, 1 thread each")
    print(load())
    timed_sweep(1, 1, 1)  # start (and warm up) the forkserver once, outside the measurements

    times: dict[int, list[float]] = {1: [], 2: []}
    inner: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2, 2, 1):
        wall, in_runs = timed_sweep(args.runs, workers, args.steps)
        times[workers].append(wall)
        inner[workers].append(in_runs)
        print(f"local, {workers} worker(s): {wall:6.2f} s wall, {in_runs / args.runs:5.2f} s per run inside "
              f"run_experiment | {load()}")
    speedup = sum(times[1]) / sum(times[2])
    print(f"speed-up of 2 workers over 1: {speedup:.2f}x (target >= 1.7x on 2 otherwise idle cores)")
    local_overhead = [(t * w - i) / args.runs for w in (1, 2) for t, i in zip(times[w], inner[w])]
    print(f"local executor overhead per run: {min(local_overhead):.3f} s (min over the 4 sweeps; "
          f"max {max(local_overhead):.3f} s)")

    if args.no_ray:
        return
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init(num_cpus=2): {time.perf_counter() - start:.2f} s | {load()}")
    try:
        for label in ("cold Ray workers", "warm Ray workers"):
            wall, in_runs = timed_sweep(args.runs, 2, args.steps, executor="ray")
            overhead = (wall * 2 - in_runs) / args.runs
            print(f"ray, 2 workers ({label}): {wall:6.2f} s wall, overhead per run {overhead:.3f} s "
                  f"(local: {min(local_overhead):.3f} s; Ray - local = {overhead - min(local_overhead):+.3f} s) "
                  f"| {load()}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
