"""Path-leverage LOO and path GCV against exact leave-one-out by retraining, on the label-noise
entry's network (digits >= 5, one-hidden-layer ReLU MLP, full-batch GD at step_size 0.3).

    python scripts/path_loo_vs_exact.py            # the table of docs/results/signal-reservoir.md
    python scripts/path_loo_vs_exact.py 64:30:32   # n_train:steps:width cases of your own

Each case trains once with the path recorder and n_train more times, each without one example
(same init, same learning rate, loss = sum over the kept examples / n_train). The catalog
configuration (256:800:128) takes about 3 minutes on one thread.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_path_loo import _network_case  # noqa: E402  (the tests' brute-force case, one definition)

CASES = ["64:30:32", "64:100:32", "128:200:64", "48:800:32", "256:800:128"]


def main(cases: list[str]) -> None:
    torch.set_num_threads(1)
    print("| n_train | steps | width | mean self-leverage | train loss | exact LOO | path-leverage LOO | path GCV "
          "| U-statistic (ustat) | LOO rel. err | GCV rel. err | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        n, steps, width = (int(v) for v in case.split(":"))
        start = time.perf_counter()
        row, exact = _network_case(n, steps, width)
        loo, gcv = row["poprisk_loo"], row["poprisk_gcv"]
        print(f"| {n} | {steps} | {width} | {row['leverage']:.3f} | {row['loss']:.4f} | {exact:.4f} | {loo:.4f} "
              f"| {gcv:.4f} | {row['poprisk_ustat']:.4f} | {loo / exact - 1:+.1%} | {gcv / exact - 1:+.1%} "
              f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or CASES)
