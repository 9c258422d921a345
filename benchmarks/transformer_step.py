"""Training step of the grokking transformer: the last block at the last position only vs the full forward.

    python benchmarks/transformer_step.py [--threads 1] [--reps 30]

The paper-setting model (a / b mod 97, width 128, 2 layers, 4 heads, 422,497 parameters), batch 512,
AdamW; one forward (cross-entropy in float64, as the entry computes it), backward and step. The
baseline is the same model computing every position of every block and taking the last row, which is
what ``Transformer.forward`` did before; both run in this process, interleaved, and their logits are
compared. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmech.experiments.grokking import GrokkingConfig, build


def full_forward(model, tokens):
    """Every block at every position, then the last row (the baseline)."""
    h = model.features(tokens)[-1]
    return model.unembed(model.ln_f(h[:, -1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, model = build(GrokkingConfig(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    idx = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(0))[:512]
    x, y = data.x_train[idx], data.y_train[idx]
    with torch.no_grad():
        diff = float((model(x).double() - full_forward(model, x).double()).abs().max())

    def step(forward):
        t = time.perf_counter()
        loss = F.cross_entropy(forward(model, x).double(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    fast, slow = [], []
    for _ in range(5):
        step(lambda m, t: m(t))
        step(full_forward)
    for _ in range(args.reps):
        fast.append(step(lambda m, t: m(t)))
        slow.append(step(full_forward))
    f, s = statistics.median(fast), statistics.median(slow)
    print(f"max |logits difference| {diff:.2e}")
    print(f"full forward (baseline)      {1e3 * s:7.1f} ms per step")
    print(f"last block at last position  {1e3 * f:7.1f} ms per step   {s / f:.2f}x faster")


if __name__ == "__main__":
    main()
