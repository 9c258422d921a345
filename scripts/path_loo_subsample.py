"""Can the leave-one-out estimate come from a probe subset? Measured: no (docs/results/signal-reservoir.md).

Trains the label-noise MLP on 192 digits (full-batch GD, recorded every 10 steps) with two path
recorders: one on all 192 examples, one on a random quarter of them, whose self-leverage is rescaled
by 48/192 (for a uniform subsample the kernel operator K_SS / n_S has about the spectrum of K / n,
so H_ii ~ D_ii / n). Prints both estimates and mean self-leverages over training.

    python scripts/path_loo_subsample.py
"""

import torch

from lmech.experiments.signal_runs import binary_task, gd_step_size, initial_kernel
from lmech.models import MLP
from lmech.probes.gramian import PathRecorder, half_mse
from lmech.probes.path_loo import path_loo


def main(n: int = 192, n_sub: int = 48, steps: int = 300, every: int = 10) -> None:
    torch.set_num_threads(1)
    data = binary_task("digits", n, 8, 0.0, 0)
    torch.manual_seed(0)
    model = MLP(data.x.shape[1], 1, width=64, depth=1)
    lr = gd_step_size(initial_kernel(model, data.x), 0.3)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n_sub]
    full = PathRecorder(model, data.x, data.y, data.x_query)
    part = PathRecorder(model, data.x[sub], data.y[sub], data.x_query)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    full.start()
    part.start()
    print("| step | full: LOO | full: GCV | full: mean leverage | subset: LOO | subset: GCV | subset: mean leverage |")
    print("|---|---|---|---|---|---|---|")
    for step in range(1, steps + 1):
        opt.zero_grad()
        half_mse(model(data.x), data.y).backward()
        opt.step()
        if step % every == 0:
            a = full.step(lr, steps=every)
            part.step(lr, steps=every)
            if step % 50 == 0:
                b = path_loo(part.path.D * (n_sub / n), part.outputs()[0].reshape(n_sub, 1), part.y)
                print(f"| {step} | {a['poprisk_loo']:.4f} | {a['poprisk_gcv']:.4f} | {a['leverage']:.3f} "
                      f"| {b.loo:.4f} | {b.gcv:.4f} | {b.leverage:.3f} |")


if __name__ == "__main__":
    main()
