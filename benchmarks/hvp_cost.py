"""Cost of one Hessian-vector product relative to one gradient, same model and batch.

Compares, in one process (CPU, one thread), the median wall time of:

* one gradient: ``loss.backward()`` on the batch (the baseline, ratio 1);
* lmech's HVP as ``HessianOperator`` computes it on a whole batch: reverse-over-reverse on a
  cached gradient graph (the graph is built once, not counted per product);
* the same operator built anew for every product (graph build included: the cost of a
  single, isolated HVP);
* forward-over-reverse ``lmech.core.hvp`` (``jvp(grad)``; also the chunked path of
  ``HessianOperator``).

    python benchmarks/hvp_cost.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmech.core import flatten, hvp, unflatten
from lmech.models import MLP, Transformer
from lmech.probes.base import differentiable_kernels
from lmech.probes.sharpness import HessianOperator


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for width in (128, 512):
        model = MLP(d_in=40, d_out=10, width=width, depth=2, activation="tanh").eval()
        x, y = torch.randn(512, 40, generator=g), torch.randint(0, 10, (512,), generator=g)
        yield f"MLP 40-{width}-{width}-10, batch 512", model, x, y, F.cross_entropy
    model = Transformer(vocab_size=99, seq_len=4, n_out=97, d_model=128, n_heads=4, n_layers=2, d_mlp=512).eval()
    x, y = torch.randint(0, 99, (256, 4), generator=g), torch.randint(0, 97, (256,), generator=g)
    yield "Transformer d128 L2 (grokking size), batch 256", model, x, y, F.cross_entropy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':48s} {'params':>8s} {'grad ms':>8s} {'HVP/grad':>9s} {'isolated':>9s} {'fwd-rev':>8s}")
    for name, model, x, y, loss_fn in cases():
        n = sum(p.numel() for p in model.parameters())

        def grad():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        t_grad = median_time(grad, args.repeats)
        model.zero_grad(set_to_none=True)
        op = HessianOperator(model, loss_fn, (x, y))
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
        t_hvp = median_time(lambda: op.matvec(v), args.repeats)
        t_iso = median_time(lambda: HessianOperator(model, loss_fn, (x, y)).matvec(v), args.repeats)
        vt = unflatten(v, op.fm.params)

        def fwd_rev():
            with differentiable_kernels():  # fused attention has no forward-mode derivative
                return flatten(hvp(op.fm, loss_fn, x, y, vt))

        t_fr = median_time(fwd_rev, args.repeats)
        print(f"{name:48s} {n:8d} {t_grad * 1e3:8.1f} {t_hvp / t_grad:8.2f}x {t_iso / t_grad:8.2f}x "
              f"{t_fr / t_grad:7.2f}x")
    print("RATIO columns: median time of one product / median time of one gradient (loss.backward)")


if __name__ == "__main__":
    main()
