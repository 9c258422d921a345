"""Cost of one Hessian-vector product relative to one gradient, same model and batch.

Compares, in one process (CPU, one thread), the median wall time of:

* one gradient: ``loss.backward()`` on the batch (the baseline, ratio 1);
* lmech's HVP as ``HessianOperator`` computes it on a whole batch: reverse-over-reverse on a
  cached gradient graph (the graph is built once, not counted per product), including its
  flatten/unflatten of the flat Lanczos vector;
* PyHessian 0.1's ``hessian_vector_product`` (the same reverse-over-reverse on the graph of
  ``loss.backward(create_graph=True)``, on lists of tensors), when PyHessian is installed;
* the same lmech operator built anew for every product (graph build included: the cost of a
  single, isolated HVP);
* forward-over-reverse ``lmech.core.hvp`` (``jvp(grad)``; also the chunked path of
  ``HessianOperator``);
* the setup each method pays once before its first product: ``HessianOperator(...)``
  (forward + gradient with ``create_graph``) and PyHessian's ``hessian(...)`` constructor
  (the same, through ``loss.backward(create_graph=True)``).

The first case is the model and batch of ``benchmarks/sharpness_vs_pyhessian.py``.

    python benchmarks/hvp_cost.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from lmech.core import flatten, hvp, unflatten
from lmech.models import MLP, Transformer
from lmech.probes.sharpness import HessianOperator

try:
    ph = importlib.import_module("pyhessian.hessian")
except ImportError:  # optional: the PyHessian columns print n/a
    ph = None


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
    from lmech.tasks import get_task

    task = get_task("mnist1d")
    model = MLP(d_in=40, d_out=10, width=256, depth=2, activation="tanh").eval()
    yield ("MLP 40-256-256-10 tanh, batch 1000 (mnist1d)", model, task.x_train[:1000],
           task.y_train[:1000], F.cross_entropy)
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
    print(f"{'model':48s} {'params':>8s} {'grad ms':>8s} {'HVP/grad':>9s} {'PyH HVP':>8s} {'isolated':>9s} "
          f"{'fwd-rev':>8s} {'setup':>6s} {'PyH setup':>9s}")
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
        t_setup = median_time(lambda: HessianOperator(model, loss_fn, (x, y)), args.repeats)
        t_iso = median_time(lambda: HessianOperator(model, loss_fn, (x, y)).matvec(v), args.repeats)
        vt = unflatten(v, op.fm.params)
        t_fr = median_time(lambda: flatten(hvp(op.fm, loss_fn, x, y, vt)), args.repeats)  # fused attention handled inside
        op = None  # free its graph before PyHessian builds its own
        p_hvp = p_setup = float("nan")
        if ph is not None and not isinstance(model, Transformer):  # PyHessian feeds one input tensor
            h = ph.hessian(model, loss_fn, data=(x, y), cuda=False)
            vs = list(vt.values())
            p_hvp = median_time(lambda: ph.hessian_vector_product(h.gradsH, h.params, vs), args.repeats)
            h = None
            p_setup = median_time(lambda: ph.hessian(model, loss_fn, data=(x, y), cuda=False), args.repeats)
            model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph gradients in .grad
        print(f"{name:48s} {n:8d} {t_grad * 1e3:8.1f} {t_hvp / t_grad:8.2f}x {p_hvp / t_grad:7.2f}x "
              f"{t_iso / t_grad:8.2f}x {t_fr / t_grad:7.2f}x {t_setup / t_grad:5.2f}x {p_setup / t_grad:8.2f}x")
    print("RATIO columns: median time of one product (or setup) / median time of one gradient (loss.backward)")


if __name__ == "__main__":
    main()
