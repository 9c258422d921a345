"""Monitor cost on a real model: transformers GPT-2 (random init, about 10M parameters, CPU, one
thread), economy preset every 100 steps, next to the MLP of benchmarks/monitor_overhead.py.

Per repeat: median AdamW training-step time over ``--steps`` steps, one measurement of the economy
preset with its fixed samples (32 examples for gradient noise, 64 for sharpness) and one of the
economy preset sized by the training batch (``preset("economy", train_batch=--batch)``), with
per-probe seconds from the Monitor's ``<probe>/seconds``; overhead at every=100 is measurement /
(100 x step). Medians over ``--repeats``, interleaved in one process; the last line is the ratio
of the two overheads.

    PYTHONPATH=src python benchmarks/monitor_overhead_gpt2.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from lmech import Monitor
from lmech.monitor import preset
from lmech.integrations.zoo import gpt2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--probe-examples", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    z = gpt2("small", examples=args.probe_examples, seq=args.seq)
    model, loss_fn = z.model, z.loss_fn
    print(f"GPT-2 {z.num_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"probe batch {args.probe_examples} (economy uses 32 for gradient noise, 64 for sharpness)")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    monitors = {"fixed": Monitor(model, loss_fn, z.batch, probes="economy", every=100, output="logits"),
                "sized": Monitor(model, loss_fn, z.batch, probes=preset("economy", train_batch=args.batch),
                                 every=100, output="logits")}
    steps = []
    measures = {name: [] for name in monitors}
    per_probe = {name: {} for name in monitors}
    for r in range(args.repeats):
        model.train()
        times = []
        for _ in range(args.steps):
            ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(input_ids=ids).logits, {"input_ids": ids}).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        steps.append(statistics.median(times))
        for name, mon in monitors.items():
            t0 = time.perf_counter()
            m = mon.measure(100 * r, optimizer=opt)
            measures[name].append(time.perf_counter() - t0)
            for k, v in m.items():
                if k.endswith("/seconds"):
                    per_probe[name].setdefault(k[: -len("/seconds")], []).append(float(v))
        print(f"repeat {r}: step {steps[-1] * 1e3:.0f} ms, measurement "
              + ", ".join(f"{name} {measures[name][-1]:.2f} s" for name in monitors), flush=True)
    step = statistics.median(steps)
    print(f"\nmedian training step {step * 1e3:.0f} ms")
    overhead = {}
    for name in monitors:
        meas = statistics.median(measures[name][1:] or measures[name])
        overhead[name] = meas / (100 * step)
        label = "fixed samples (32 / 64 examples)" if name == "fixed" else \
            f"sized by the training batch (train_batch={args.batch})"
        print(f"economy, {label}: measurement {meas:.2f} s (after the first; first {measures[name][0]:.2f} s), "
              f"overhead at every=100: {overhead[name]:.1%}")
        for probe, vals in per_probe[name].items():
            v = statistics.median(vals[1:] or vals)
            print(f"  {probe:10s} {v:7.2f} s  ({v / (100 * step):.1%})")
    print(f"ratio fixed / sized overhead: {overhead['fixed'] / overhead['sized']:.1f}x")

if __name__ == "__main__":
    main()
