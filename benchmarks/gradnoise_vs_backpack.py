"""Gradient noise against BackPACK's ``Variance`` extension, same model, batch and process.

The MLP 40-W-W-10 (ReLU; W=1000 gives about 1.05M parameters), ``--batch`` random examples,
mean cross-entropy, one thread. Arms, interleaved ``--repeats`` times, medians and ranges:

* ``backpack``: ``extend`` model and loss, ``with backpack(Variance()): loss.backward()``, then the
  per-coordinate SNR from ``p.grad`` and ``p.variance`` (one elementwise pass);
* ``lmech coordinates``: ``grad_noise(..., stderr=False, summaries=False, precision="model")``
  and its per-coordinate ``variance`` and ``snr`` (the same statistics, in the model's dtype as
  BackPACK computes them);
* ``lmech coordinates f64``: the same with the default ``precision="float64"`` (exact float64
  products of the float32 factors);
* ``lmech default``: ``grad_noise(...)`` with everything (per-layer and global SNR, gate
  fraction, noise scale, jackknife standard errors), then the same per-coordinate values.

Before timing, the per-coordinate variances are checked against BackPACK's (relative 1e-4;
BackPACK's ``variance`` of a mean loss is :math:`\\frac{1}{b^3}\\sum_i (g_i - \\bar g)^2` (its individual
gradients are :math:`g_i/b`), lmech's
``variance`` the unbiased :math:`\\frac{1}{b-1}\\sum_i (g_i - \\bar g)^2`, compared after the factor).
``backpack-for-pytorch`` is a benchmark-only dependency (extra ``lmech[bench]``).

    python benchmarks/gradnoise_vs_backpack.py [--width 1000] [--batch 256] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmech.probes.gradnoise import grad_noise


def mlp(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from backpack import backpack, extend
    from backpack.extensions import Variance

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 40, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    b = args.batch

    bp_model = extend(mlp(args.width))
    bp_loss = extend(nn.CrossEntropyLoss())
    model = mlp(args.width)
    params = sum(p.numel() for p in model.parameters())

    def run_backpack():
        bp_model.zero_grad()
        loss = bp_loss(bp_model(x), y)
        with backpack(Variance()):
            loss.backward()
        # per-coordinate SNR gbar^2 / (sigma^2 / b), sigma^2 the unbiased per-example variance
        out = {}
        for n, p in bp_model.named_parameters():
            var = p.variance * (b * b * b / (b - 1))  # BackPACK's g_i of a mean loss are g_i / b
            out[n] = (var, p.grad.square() * b / var)
        return out

    def run_coordinates():
        gn = grad_noise(model, F.cross_entropy, (x, y), stderr=False, summaries=False, precision="model")
        return gn.variance, gn.snr

    def run_coordinates64():
        gn = grad_noise(model, F.cross_entropy, (x, y), stderr=False, summaries=False)
        return gn.variance, gn.snr

    def run_default():
        gn = grad_noise(model, F.cross_entropy, (x, y))
        return gn.variance, gn.snr, gn.total.snr_stderr

    ref = run_backpack()
    var, snr = run_coordinates()
    worst = max(float(((var[n] - ref[n][0]).abs() / ref[n][0].abs().clamp_min(1e-30)).max()) for n in var)
    scale = max(float(ref[n][0].abs().max()) for n in var)
    worst_abs = max(float((var[n] - ref[n][0]).abs().max()) for n in var) / scale
    print(f"MLP 40-{args.width}-{args.width}-10: {params:,} parameters, batch {b}, one thread")
    print(f"variance vs BackPACK: max difference {worst_abs:.1e} of the largest variance "
          f"(max elementwise relative {worst:.1e})")
    assert worst_abs < 1e-4, "lmech and BackPACK disagree"

    arms = {"backpack Variance": run_backpack, "lmech coordinates": run_coordinates,
            "lmech coordinates f64": run_coordinates64, "lmech default": run_default}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["backpack Variance"])
    print(f"{'arm':<22} {'median ms':>10} {'range ms':>16} {'/ BackPACK':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22} {med * 1e3:>10.1f} {min(ts) * 1e3:>7.1f}-{max(ts) * 1e3:<8.1f} {med / base:>11.2f}")


if __name__ == "__main__":
    main()
