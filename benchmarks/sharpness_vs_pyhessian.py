"""Top Hessian eigenvalue: lmech.probes.sharpness (Lanczos) vs PyHessian (power iteration).

Same model, same batch, same loss, one process, CPU, one thread. The reference value lambda* is
lmech's Lanczos run to a relative residual of 1e-9 (an eigenvalue is certified within 1e-9 of it).
For each of several random start vectors (seeds) we record, per method:

* HVPs and seconds until the estimate is first within 1% of lambda* (an oracle criterion, the same
  for both: PyHessian's running estimate is read after every HVP through a counting wrapper,
  lmech's top Ritz value through the `callback` of `sharpness`), and
* HVPs and seconds until the method stops by its own rule (lmech: residual certificate
  r / theta <= 1e-2, which bounds the relative error by 1%; PyHessian: successive estimates
  within tol = 1e-3, its default) and the relative error at that point.

Seconds include each method's setup (PyHessian's create_graph backward; lmech's cached graph).
Per product both cost the same (reverse-over-reverse on the cached graph; ``benchmarks/hvp_cost.py``),
so the ratio is about the number of products. lmech runs with its defaults: Lanczos from
``start="gradient"`` (unit gradient plus a unit random vector; see ``sharpness``); the same run
from a random start (``start="random"``, lmech's previous default) is reported too, since
PyHessian's power iteration starts from a random vector.

PyHessian 0.1 (the PyPI release) imports and its `eigenvalues` runs on torch 2.13 CPU with
`cuda=False`; nothing is patched. The only change is instrumentation: the module-level name
`pyhessian.hessian.hessian_vector_product` is wrapped to count products and record the Rayleigh
quotient after each one. (Its `density()` calls `torch.eig`, removed from PyTorch, and is not used.)

Then the top-k (``--k``, default 5) with each method's own stopping rule.

    python benchmarks/sharpness_vs_pyhessian.py [--steps 300] [--seeds 5] [--width 256] [--k 5]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from lmech.models import MLP
from lmech.probes.sharpness import sharpness
from lmech.tasks import get_task

ph = importlib.import_module("pyhessian.hessian")  # the package re-exports a class of the same name


def trained_model(width: int, steps: int, seed: int = 0):
    task = get_task("mnist1d")
    torch.manual_seed(seed)
    model = MLP(d_in=40, d_out=10, width=width, depth=2, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(task.x_train), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
        opt.step()
    model.eval()
    return model, (task.x_train[:1000], task.y_train[:1000])


def run_pyhessian(model, batch, lam, seed, max_iter=200):
    trace = []
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        hv = original(gradsH, params, v)
        trace.append((time.perf_counter(), float(sum((a * b).sum() for a, b in zip(hv, v)))))
        return hv

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
        t0 = time.perf_counter()
        h = ph.hessian(model, F.cross_entropy, data=batch, cuda=False)
        eigs, _ = h.eigenvalues(maxIter=max_iter, tol=1e-3, top_n=1)
        t_end = time.perf_counter()
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
    first = next((i for i, (_, v) in enumerate(trace) if abs(v - lam) <= 0.01 * lam), None)
    return {
        "hvps_1pct": None if first is None else first + 1,
        "sec_1pct": None if first is None else trace[first][0] - t0,
        "hvps_stop": len(trace),
        "sec_stop": t_end - t0,
        "err_stop": abs(eigs[0] - lam) / lam,
    }


def run_lmech(model, batch, lam, seed, start="gradient"):
    trace = []
    t0 = time.perf_counter()
    res = sharpness(model, F.cross_entropy, batch, k=1, tol=1e-2, seed=seed, start=start,
                    callback=lambda m, theta, r: trace.append((time.perf_counter(), m, float(theta[0]))))
    sec = time.perf_counter() - t0
    first = next((i for i, (_, _, v) in enumerate(trace) if abs(v - lam) <= 0.01 * lam), None)
    return {"hvps_1pct": trace[first][1], "sec_1pct": trace[first][0] - t0,
            "hvps_stop": res.num_hvps, "sec_stop": sec, "err_stop": abs(res.top - lam) / lam,
            "bound": float(res.relative_error_bound[0])}


def top_k(model, batch, exact, k, seeds):
    """Top-k with each method's own stopping rule (PyHessian: power iteration with deflation,
    top_n=k, tol 1e-3, at most 100 iterations per eigenvalue; lmech: Lanczos, tol 1e-2)."""
    rows = []
    for seed in range(seeds):
        count = [0]
        original = ph.hessian_vector_product

        def counted(*a):
            count[0] += 1
            return original(*a)

        ph.hessian_vector_product = counted
        try:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            eigs, _ = ph.hessian(model, F.cross_entropy, data=batch, cuda=False).eigenvalues(
                maxIter=100, tol=1e-3, top_n=k)
            p_sec = time.perf_counter() - t0
        finally:
            ph.hessian_vector_product = original
            model.zero_grad(set_to_none=True)
        p_err = float(((torch.tensor(sorted(eigs, reverse=True), dtype=torch.float64) - exact).abs() / exact).max())
        t0 = time.perf_counter()
        res = sharpness(model, F.cross_entropy, batch, k=k, tol=1e-2, seed=seed)
        m_sec = time.perf_counter() - t0
        m_err = float(((res.eigenvalues - exact).abs() / exact).max())
        rows.append((count[0], p_sec, p_err, res.num_hvps, m_sec, m_err))
        print(f"top-{k} seed {seed}: PyHessian {count[0]} HVPs {p_sec:.3f} s (max error {p_err:.1e}) | "
              f"lmech {res.num_hvps} HVPs {m_sec:.3f} s (max error {m_err:.1e})")
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"RATIO top-{k}, own stopping rules: PyHessian / lmech = {med[1] / med[4]:.2f}x time "
          f"({med[0] / med[3]:.2f}x HVPs); median max errors {med[2]:.1e} vs {med[5]:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="SGD steps before measuring")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--k", type=int, default=5, help="also compare the top-k (own stopping rules)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, batch = trained_model(args.width, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    ref = sharpness(model, F.cross_entropy, batch, k=max(2, args.k), tol=1e-9, max_iter=300)
    lam = ref.top
    print(f"model: MLP 40-{args.width}-{args.width}-10 tanh, {n_params} parameters, batch 1000 (mnist1d), "
          f"after {args.steps} SGD steps")
    print(f"lambda_1 = {lam:.6f}, lambda_2 = {float(ref.eigenvalues[1]):.6f} "
          f"(ratio {float(ref.eigenvalues[1]) / lam:.3f}; reference: Lanczos, {ref.num_hvps} HVPs)")
    rows, rand = [], []
    for seed in range(args.seeds):
        p = run_pyhessian(model, batch, lam, seed)
        m = run_lmech(model, batch, lam, seed)
        r = run_lmech(model, batch, lam, seed, start="random")
        rows.append((p, m))
        rand.append(r)
        print(f"seed {seed}: PyHessian: 1% after {p['hvps_1pct']} HVPs "
              f"{p['sec_1pct'] and round(p['sec_1pct'], 3)} s, stops after {p['hvps_stop']} HVPs "
              f"{p['sec_stop']:.3f} s (error {p['err_stop']:.1e}) | lmech: 1% after {m['hvps_1pct']} HVPs "
              f"{m['sec_1pct']:.3f} s, stops after {m['hvps_stop']} HVPs {m['sec_stop']:.3f} s "
              f"(error {m['err_stop']:.1e}, certified bound {m['bound']:.1e}) | lmech start='random': 1% after "
              f"{r['hvps_1pct']} HVPs {r['sec_1pct']:.3f} s, stops after {r['hvps_stop']} HVPs {r['sec_stop']:.3f} s")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    reached = [p for p, _ in rows if p["sec_1pct"] is not None]
    m_sec, m_hvp = med([m["sec_stop"] for _, m in rows]), med([m["hvps_stop"] for _, m in rows])
    if not reached:
        print("PyHessian never reached 1% within 200 iterations")
        return
    print("\nmedians over seeds (time includes setup)")
    p_sec, p_hvp = med([p["sec_1pct"] for p in reached]), med([p["hvps_1pct"] for p in reached])
    l_sec, l_hvp = med([m["sec_1pct"] for _, m in rows]), med([m["hvps_1pct"] for _, m in rows])
    print(f"  first within 1% of lambda*: PyHessian {p_hvp} HVPs {p_sec:.3f} s "
          f"({len(reached)}/{len(rows)} seeds within 200 iterations); lmech {l_hvp} HVPs {l_sec:.3f} s")
    ps_sec, ps_hvp = med([p["sec_stop"] for p, _ in rows]), med([p["hvps_stop"] for p, _ in rows])
    print(f"  own stopping rule: PyHessian (tol 1e-3) {ps_hvp} HVPs {ps_sec:.3f} s, median error "
          f"{med([p['err_stop'] for p, _ in rows]):.1e}; lmech (certified 1%) {m_hvp} HVPs {m_sec:.3f} s, "
          f"median error {med([m['err_stop'] for _, m in rows]):.1e}")
    print(f"RATIO time to 1%: PyHessian / lmech = {p_sec / l_sec:.2f}x (HVPs {p_hvp / l_hvp:.2f}x)")
    print(f"RATIO time to own stop: PyHessian / lmech = {ps_sec / m_sec:.2f}x (HVPs {ps_hvp / m_hvp:.2f}x)")
    r_sec, r_hvp = med([r["sec_1pct"] for r in rand]), med([r["hvps_1pct"] for r in rand])
    rs_sec, rs_hvp = med([r["sec_stop"] for r in rand]), med([r["hvps_stop"] for r in rand])
    print(f"RATIO with lmech start='random' (no gradient start): time to 1% {p_sec / r_sec:.2f}x "
          f"(HVPs {p_hvp / r_hvp:.2f}x), to own stop {ps_sec / rs_sec:.2f}x (HVPs {ps_hvp / rs_hvp:.2f}x)")
    if args.k > 1:
        top_k(model, batch, ref.eigenvalues[: args.k], args.k, min(args.seeds, 3))


if __name__ == "__main__":
    main()
