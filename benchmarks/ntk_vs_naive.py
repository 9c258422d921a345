"""Empirical NTK: lmech.probes.ntk vs the naive torch.func Jacobian-contraction recipe.

The naive recipe is the one in PyTorch's "Neural Tangent Kernels" tutorial: per-example
Jacobians ``vmap(jacrev(f_single))`` of x1 and of x2 (computed twice even when x2 = x1), flattened
per parameter, contracted with ``einsum('Naf,Mbf->NMab')`` per parameter tensor, stacked and
summed. lmech computes the same (n*o, n*o) kernel with ``ntk(model, x)``: ``"auto"`` (the cost
model's choice), each algorithm forced (all three with no memory budget), and ``"auto"`` with a
memory budget (``lmech-auto-budget``: the work is blocked to fit). The budget is 32 MiB, or, where
the kernel plus one example's working memory does not fit in 32 MiB (``--width 1000``: 51.6 MiB),
the smallest whole number of MiB that holds two examples' working memory next to the kernel
(:func:`budget_bytes`); the benchmark prints the budget it used and lmech's refusal of 32 MiB.

Each method runs in a fresh subprocess (CPU, one thread): the kernel is computed once (that run's
peak memory is measured) and then again (that run is timed). Peak memory is the peak resident set
size of the subprocess during the first computation minus its resident size just before it
(after the model and inputs are built): the kernel's high-water mark ``VmHWM`` is reset by
writing ``5`` to ``/proc/self/clear_refs`` and read from ``/proc/self/status`` (Linux). Results
are checked equal (max abs difference over max abs entry) against the naive kernel in the
parent process.

    python benchmarks/ntk_vs_naive.py [--n 64] [--width 256] [--outputs 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch.func import functional_call, jacrev, vmap

from lmech.errors import MemoryBudgetError
from lmech.models import MLP
from lmech.probes.ntk import ntk, ntk_cost

METHODS = ("naive", "lmech-auto", "lmech-jacobian", "lmech-products", "lmech-auto-budget")
BUDGET_MB = 32  # for lmech-auto-budget: ntk(..., max_bytes=32 MiB), blocked to fit, when it fits


def setup(n, width, outputs, seed=0):
    torch.manual_seed(seed)
    model = MLP(d_in=40, d_out=outputs, width=width, depth=2, activation="tanh").eval()
    x = torch.randn(n, 40, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def naive_ntk(model, x1, x2, trace):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    expr = "Naf,Maf->NM" if trace else "Naf,Mbf->NMab"
    result = torch.stack([torch.einsum(expr, j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)
    if trace:
        return result
    n, m, o, _ = result.shape
    return result.permute(0, 2, 1, 3).reshape(n * o, m * o)  # example-major, like lmech


def budget_bytes(model, x, trace) -> int:
    """32 MiB, or the smallest whole MiB holding the kernel and two examples' working memory of
    the algorithm the cost model picks when 32 MiB cannot hold even one (larger models)."""
    cost = ntk_cost(model, x, trace_outputs=trace)
    one = 2 * cost.example_jacobian_bytes if cost.choice == "jacobian" else cost.products_column_bytes
    if cost.kernel_bytes + one <= BUDGET_MB * 2**20:
        return BUDGET_MB * 2**20
    need = cost.kernel_bytes + 2 * one
    return -(-need // 2**20) * 2**20


def compute(method, model, x, trace):
    if method == "naive":
        return naive_ntk(model, x, x, trace)
    if method == "lmech-auto-budget":
        return ntk(model, x, "auto", trace_outputs=trace, max_bytes=budget_bytes(model, x, trace))
    impl = method.split("-")[1]
    return ntk(model, x, impl, trace_outputs=trace, max_bytes=None)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args):
    torch.set_num_threads(1)
    model, x = setup(args.n, args.width, args.outputs)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    K = compute(args.child, model, x, args.trace)
    peak = _status_kib("VmHWM") - base
    del K
    t0 = time.perf_counter()
    compute(args.child, model, x, args.trace)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--outputs", type=int, default=10)
    ap.add_argument("--trace", action="store_true", help="output-traced (n, n) kernels")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(1)
    model, x = setup(args.n, args.width, args.outputs)
    cost = ntk_cost(model, x, trace_outputs=args.trace)
    n_params = sum(p.numel() for p in model.parameters())
    kind = "traced (n x n)" if args.trace else f"full ({args.n * args.outputs} x {args.n * args.outputs})"
    print(f"MLP 40-{args.width}-{args.width}-{args.outputs} tanh, {n_params} params, n = {args.n}, kernel {kind}")
    print(f"cost model: F = {cost.forward_flops:.3g} FLOPs/example, jacobian {cost.jacobian_flops:.3g} FLOPs, "
          f"products {cost.products_flops:.3g} FLOPs -> auto = {cost.choice}")
    budget = budget_bytes(model, x, args.trace)
    if budget != BUDGET_MB * 2**20:
        try:
            ntk(model, x, "auto", trace_outputs=args.trace, max_bytes=BUDGET_MB * 2**20)
        except MemoryBudgetError as err:
            print(f"  {BUDGET_MB} MiB refused by lmech: {err}")
    print(f"lmech-auto-budget runs with max_bytes = {budget / 2**20:.0f} MiB")
    ref = compute("naive", model, x, args.trace)
    scale = float(ref.abs().max())
    results = {}
    for method in METHODS:
        if method != "naive":
            diff = float((compute(method, model, x, args.trace) - ref).abs().max()) / scale
        else:
            diff = 0.0
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n), "--width", str(args.width),
               "--outputs", str(args.outputs)] + (["--trace"] if args.trace else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[method]
        print(f"  {method:16s} {r['seconds']:8.3f} s   peak +{r['peak_mib']:8.1f} MiB   "
              f"max rel diff vs naive {diff:.1e}")
    base = results["naive"]
    for method in METHODS[1:]:
        r = results[method]
        print(f"RATIO {method}: {base['seconds'] / r['seconds']:.2f}x faster, "
              f"{base['peak_mib'] / max(r['peak_mib'], 1e-9):.2f}x less peak memory than naive")


if __name__ == "__main__":
    main()
