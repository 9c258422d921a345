"""Accuracy and cost of the economy preset's sharpness setting, against a converged Lanczos.

The Monitor benchmark's loop (MLP 40-256-256-10 on mnist1d, AdamW, batch 128) runs ``--steps``
steps; every 100 steps each candidate ``SharpnessProbe(tol, max_iter)`` measures the top Hessian
eigenvalue on the first 64 probe examples, warm-started from its own previous measurement as in
the Monitor, and a cold Lanczos run to a relative residual of 1e-7 gives the reference. Printed
per setting: mean HVPs per measurement, the actual relative error (median and max), the certified
bound ``rel_error`` (median, and how often it ended above the tolerance). For scale, the same
reference on the first 1,024 examples: how far the 64-example Hessian's top eigenvalue (the
preset's subset) is from a larger sample's.

    python benchmarks/economy_sharpness_accuracy.py [--steps 5000]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from lmech.models import MLP
from lmech.probes.base import TrainState
from lmech.probes.sharpness import SharpnessProbe, sharpness
from lmech.tasks import get_task

SETTINGS = [(2e-2, 5), (3e-2, 4), (5e-2, 4), (5e-2, 3)]  # (tol, max_iter); the economy preset uses (5e-2, 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task("mnist1d")
    torch.manual_seed(0)
    model = MLP(d_in=40, d_out=10, width=256, depth=2, activation="relu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    probe_batch = (task.x_train[:256], task.y_train[:256])
    first64 = (task.x_train[:64], task.y_train[:64])
    first1024 = (task.x_train[:1024], task.y_train[:1024])
    subset_ratio = []  # lambda_1 on 64 examples / on 1024
    probes = {s: SharpnessProbe(k=1, tol=s[0], max_iter=s[1], num_examples=64) for s in SETTINGS}
    rows = {s: [] for s in SETTINGS}  # (actual relative error, certified bound, hvps)
    for step in range(args.steps):
        if step % 100 == 0:
            model.eval()
            exact = sharpness(model, F.cross_entropy, first64, k=1, tol=1e-7, max_iter=200).top
            subset_ratio.append(exact / sharpness(model, F.cross_entropy, first1024, k=1, tol=1e-4, max_iter=200).top)
            state = TrainState(model, F.cross_entropy, probe_batch, step, opt)
            for s, probe in probes.items():
                out = probe.measure(state)
                rows[s].append((abs(out["lambda_1"] - exact) / exact, out["rel_error"], out["hvps"]))
            model.train()
        idx = torch.randint(0, len(task.x_train), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
        opt.step()
    print(f"MLP 40-256-256-10, AdamW, {args.steps} steps, {len(rows[SETTINGS[0]])} measurements on 64 examples")
    print("tol    max_iter  HVPs/measurement  actual error median / max   certified bound median   bound > tol")
    for (tol, max_iter), r in rows.items():
        err, bound, hvps = zip(*r)
        print(f"{tol:<6g} {max_iter:<9d} {statistics.mean(hvps):<17.2f} {statistics.median(err):.1e} / {max(err):.1e}"
              f"{'':14s}{statistics.median(bound):.1e}{'':17s}{sum(b > tol for b in bound)}/{len(bound)}")

    print(f"lambda_1 on the 64 examples / on 1,024 examples: median {statistics.median(subset_ratio):.2f}, "
          f"range {min(subset_ratio):.2f}-{max(subset_ratio):.2f}")


if __name__ == "__main__":
    main()
