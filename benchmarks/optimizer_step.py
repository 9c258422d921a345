"""Step time of PopRiskAdamW relative to torch.optim.AdamW(foreach=True), measured in one process.

    python benchmarks/optimizer_step.py [--threads 1] [--reps 15] [--steps 5] [--gate soft] [--reduction element]
                                        [--blocks 17,19,21] [--no-compile]

Model: an MLP 512 -> 2048 -> 2048 -> 2048 -> 512 (10.5M parameters) with gradients from one real
backward pass (the step does not depend on their values' provenance). Arms, each a fresh optimizer
on its own copy of the weights: AdamW foreach (the baseline), AdamW fused (for reference),
PopRiskAdamW with the foreach path and with the torch.compile-d per-tensor kernel (``fused=True``;
compilation happens during warm-up and is reported separately). Repetitions are interleaved
(arm order rotates every repetition) so that load from other processes hits every arm alike; each
repetition times ``--steps`` consecutive steps; the median over repetitions is reported, with the
ratio to the AdamW-foreach median. Targets: PopRiskAdamW best path / AdamW(foreach) <= 1.15
(issue 3); the default path <= 1.3 without compilation (issue 11). The last line says whether the
default and the unblocked ops ended with bitwise-identical weights and state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lmech.models import MLP
from lmech.optim import PopRiskAdamW


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    model = MLP(d_in=512, d_out=512, width=2048, depth=3)
    x = torch.randn(64, 512)
    model(x).square().mean().backward()
    return list(model.parameters())


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.detach().clone()
        out.append(q)
    return out


def unblocked(opt: PopRiskAdamW) -> PopRiskAdamW:
    opt.block_elements = None                     # the foreach ops on whole tensors
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions per arm")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per repetition")
    ap.add_argument("--gate", default="soft", choices=["soft", "hard", "snr", "none"])
    ap.add_argument("--reduction", default="element", choices=["element", "tensor"])
    ap.add_argument("--blocks", default="", help="extra block sizes for the blocked path, as log2 (e.g. 17,21)")
    ap.add_argument("--no-compile", action="store_true", help="skip the fused (torch.compile) arm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = make_params()
    n_params = sum(p.numel() for p in base)
    hyper = dict(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1)
    pop = dict(hyper, gate=args.gate, reduction=args.reduction)
    arms = {
        "adamw foreach": torch.optim.AdamW(clone_params(base), foreach=True, **hyper),
        "adamw fused": torch.optim.AdamW(clone_params(base), fused=True, **hyper),
        "poprisk default": PopRiskAdamW(clone_params(base), **pop),
        "poprisk unblocked": unblocked(PopRiskAdamW(clone_params(base), **pop)),
    }
    for k in (int(x) for x in args.blocks.split(",") if x.strip()):
        arms[f"poprisk block 2^{k}"] = PopRiskAdamW(clone_params(base), **pop)
        arms[f"poprisk block 2^{k}"].block_elements = 1 << k
    if not args.no_compile:
        arms["poprisk fused (compile)"] = PopRiskAdamW(clone_params(base), fused=True, **pop)
    warmup_s = {}
    for name, opt in arms.items():
        start = time.perf_counter()
        for _ in range(3):
            opt.step()
        warmup_s[name] = time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            opt = arms[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps)

    diag_start = time.perf_counter()
    arms["poprisk default"].diagnostics()
    diag_ms = 1e3 * (time.perf_counter() - diag_start)

    base_ms = 1e3 * statistics.median(times["adamw foreach"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end, {n_params / 1e6:.1f}M parameters in "
          f"{len(base)} tensors, gate={args.gate}, reduction={args.reduction}, {args.reps} interleaved reps x "
          f"{args.steps} steps")
    print(f"{'arm':<26}{'median ms/step':>15}{'min':>9}{'max':>9}{'ratio':>8}{'warm-up s':>11}")
    for name in names:
        ms = [1e3 * t for t in times[name]]
        med = statistics.median(ms)
        print(f"{name:<26}{med:>15.2f}{min(ms):>9.2f}{max(ms):>9.2f}{med / base_ms:>8.2f}{warmup_s[name]:>11.1f}")
    best = min(statistics.median(times[n]) for n in names if n.startswith("poprisk"))
    ratio = 1e3 * best / base_ms
    default = 1e3 * statistics.median(times["poprisk default"]) / base_ms
    print(f"diagnostics() (on demand, not part of step): {diag_ms:.1f} ms")
    print(f"PopRiskAdamW (best path) / AdamW(foreach=True) = {ratio:.2f}  "
          f"(target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    print(f"PopRiskAdamW(params) default / AdamW(foreach=True) = {default:.2f}  "
          f"(target <= 1.3 without compilation: {'met' if default <= 1.3 else 'NOT met'})")
    a, b = arms["poprisk default"], arms["poprisk unblocked"]   # both took the same number of steps
    same = all(torch.equal(x, y) and all(torch.equal(a.state[x][k], b.state[y][k])
                                         for k in ("exp_avg", "exp_avg_sq", "exp_var"))
               for x, y in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]))
    print(f"default and unblocked weights and state bitwise identical after "
          f"{3 + args.reps * args.steps} steps: {same}")


if __name__ == "__main__":
    main()
