"""Gradient noise on an MLP: the outer-product path (``method="linear"``) against per-example
gradients (``method="vmap"``), same model, batch and process.

For each width: the MLP 40-W-W-10 (ReLU) of the Monitor benchmark, ``--examples`` mnist1d
examples, cross-entropy; both methods ``--repeats`` times, interleaved, medians. The two results
are checked to agree (group statistics to 1e-4 relative, gate counts to 1e-5 of the coordinates) before the
times are printed.

    python benchmarks/gradnoise_paths.py [--widths 256 1024] [--examples 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmech.models import MLP
from lmech.probes.gradnoise import grad_noise
from lmech.tasks import get_task


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task("mnist1d")
    batch = (task.x_train[:args.examples], task.y_train[:args.examples])
    for width in args.widths:
        torch.manual_seed(0)
        model = MLP(d_in=40, d_out=10, width=width, depth=2, activation="relu").eval()
        params = sum(p.numel() for p in model.parameters())
        times = {"linear": [], "vmap": []}
        results = {}
        for _ in range(args.repeats):
            for method in times:
                dt, results[method] = timed(lambda m=method, net=model: grad_noise(net, F.cross_entropy, batch, method=m))
                times[method].append(dt)
        lin, ref = results["linear"].total, results["vmap"].total
        for field in ("grad_norm_sq", "trace_cov", "snr", "snr_stderr", "mean_gsnr", "noise_scale", "signal"):
            a, b = getattr(lin, field), getattr(ref, field)
            assert abs(a - b) <= 1e-4 * abs(b), (field, a, b)
        # a coordinate whose SNR lies within rounding of the gate threshold may vote either way
        assert abs(lin.gate_fraction - ref.gate_fraction) * lin.numel <= max(1, 1e-5 * lin.numel)
        t_lin, t_vmap = (1e3 * statistics.median(times[m]) for m in ("linear", "vmap"))
        print(f"MLP 40-{width}-{width}-10 ({params:,} parameters), {args.examples} examples: "
              f"linear {t_lin:.2f} ms, vmap {t_vmap:.2f} ms (results agree)")
        print(f"RATIO vmap / linear = {t_vmap / t_lin:.2f}x")


if __name__ == "__main__":
    main()
