"""Monitor overhead: a training loop with ``Monitor(probes="economy", every=100)`` against the
same loop without it, in one process.

The loop: an MLP (40-W-W-10, ReLU; W = ``--width``) on mnist1d (4,000 training examples), AdamW,
minibatch ``--batch``, ``--steps`` steps; the monitor's probe batch is 256 training examples. Both variants run
``--repeats`` times, interleaved (without, with, without, with, ...), CPU, one thread; the
overhead is median(with) / median(without) - 1; within a monitored run, the time inside the
Monitor over the rest (and the same without the first measurement, which holds one-time setup).
The monitored run's loss curve is also checked to be identical to the plain run's.

The process CPU time of both variants is printed too (informational: on a shared machine it
leaves out the time the process waited for a core, not the cache and memory contention).

    python benchmarks/monitor_overhead.py [--steps 1000] [--repeats 3] [--every 100] [--preset economy]
                                          [--width 256] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmech import Monitor
from lmech.models import MLP
from lmech.tasks import get_task


@dataclass
class Timed:
    seconds: float  # wall time of the loop, the Monitor included
    losses: list[float]
    monitor: Monitor | None
    cpu_seconds: float
    step_seconds: list[float]  # each training step alone
    first_measurement: float = 0.0  # seconds of the step-0 measurement (holds one-time setup)


def train(task, steps, width, batch, monitor_kwargs=None, seed=0) -> Timed:
    torch.manual_seed(seed)
    model = MLP(d_in=40, d_out=10, width=width, depth=2, activation="relu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mon = None
    if monitor_kwargs is not None:
        mon = Monitor(model, F.cross_entropy, (task.x_train[:256], task.y_train[:256]), **monitor_kwargs)
    gen = torch.Generator().manual_seed(seed)
    losses, step_seconds, first = [], [], 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        t_step = time.perf_counter()
        idx = torch.randint(0, len(task.x_train), (batch,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - t_step)
        if mon is not None:
            mon.step(step, optimizer=opt)
            if step == 0:
                first = mon.seconds
    return Timed(time.perf_counter() - t0, losses, mon, time.process_time() - c0, step_seconds, first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--preset", default="economy")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task("mnist1d")
    kwargs = dict(probes=args.preset, every=args.every)
    size = (args.width, args.batch)
    train(task, 50, *size), train(task, 50, *size, kwargs)  # warm-up (first-use costs of torch.func)
    plain, monitored, inside, steady, cpu_plain, cpu_monitored = [], [], [], [], [], []
    after, other, plain_other = [], [], []  # step times: right after a measurement, other steps, plain run
    for _ in range(args.repeats):
        base = train(task, args.steps, *size)
        plain.append(base.seconds)
        cpu_plain.append(base.cpu_seconds)
        run = train(task, args.steps, *size, kwargs)
        mon, t = run.monitor, run.seconds
        after.append(statistics.median(s for i, s in enumerate(run.step_seconds) if i % args.every == 1))
        other.append(statistics.median(s for i, s in enumerate(run.step_seconds) if i % args.every > 1))
        plain_other.append(statistics.median(base.step_seconds[1:]))
        monitored.append(t)
        cpu_monitored.append(run.cpu_seconds)
        inside.append(mon.seconds / (t - mon.seconds))
        count = len(mon.history.records)
        steady.append((mon.seconds - run.first_measurement) / (count - 1) * count / (t - mon.seconds))
        assert run.losses == base.losses, "the monitor changed the loss curve"
    per_probe = {}
    for _, metrics in mon.history.records:
        for k, v in metrics.items():
            if k.endswith("/seconds"):
                per_probe.setdefault(k[:-8], []).append(v)
    a, b = statistics.median(plain), statistics.median(monitored)
    print(f"MLP 40-{args.width}-{args.width}-10, batch {args.batch}: {args.steps} steps, {args.preset} "
          f"every {args.every} ({len(mon.history.records)} measurements)")
    print(f"  without monitor: {a:.2f} s (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"  with monitor:    {b:.2f} s (runs: {', '.join(f'{t:.2f}' for t in monitored)})")
    print("  milliseconds per measurement, by probe (median, last run): "
          + ", ".join(f"{k} {1e3 * statistics.median(v):.2f}" for k, v in per_probe.items()))
    print(f"  monitor time in the last run: {mon.seconds:.3f} s ({1e3 * mon.seconds / len(mon.history.records):.2f} ms "
          f"per measurement, probes and bookkeeping)")
    print("  loss curves identical: yes")
    print(f"  training step right after a measurement (caches refilled): {1e3 * statistics.median(after):.3f} ms; "
          f"other steps {1e3 * statistics.median(other):.3f} ms; steps of the plain runs "
          f"{1e3 * statistics.median(plain_other):.3f} ms (medians)")
    ca, cb = statistics.median(cpu_plain), statistics.median(cpu_monitored)
    print(f"  process CPU time (not counting time the process waited for a core on a shared machine): "
          f"without {ca:.2f} s, with {cb:.2f} s, overhead {100 * (cb / ca - 1):.1f}%")
    print(f"RATIO overhead across runs = {100 * (b / a - 1):.1f}% of training time")
    print(f"RATIO overhead within the monitored runs = {100 * statistics.median(inside):.1f}% of training time "
          f"(runs: {', '.join(f'{100 * r:.1f}%' for r in inside)})")
    print(f"  steady state (measurements after the first, whose one-time setup is the reference weights, a cold "
          f"Lanczos and the gradient start): {100 * statistics.median(steady):.1f}% "
          f"(runs: {', '.join(f'{100 * r:.1f}%' for r in steady)})")


if __name__ == "__main__":
    main()
