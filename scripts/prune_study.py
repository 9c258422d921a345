"""Pruning by reservoir membership vs magnitude (and random), 3 seeds, before fine-tuning (issue 14 item 3).

One command:  PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/prune_study.py --out results/prune-study
CI:           python scripts/prune_study.py --quick --out /tmp/x   (the catalog entry's quick config, 1 seed)

Writes ``rows.json`` (every seed's per-task result), ``table.md`` (median [min, max] test accuracy per
task, method and sparsity) and ``prune_study.png``. Each seed trains the MLP on digits and the CNN on
mnist1d once (:func:`lmech.experiments.prune_reservoir.run_task`); all methods prune the same weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmech.experiments.prune_reservoir import EXPERIMENT, METHODS, run_task
from lmech.experiments.figures.prune import prune_figure


def table(results: list[dict], sparsities: list[float]) -> str:
    tasks = list(results[0])
    lines = []
    for task in tasks:
        dense = [r[task]["dense_test_acc"] for r in results]
        lines += [f"**{task}** (dense test accuracy {np.median(dense):.3f} [{min(dense):.3f}, {max(dense):.3f}], "
                  f"{len(results)} seeds; median [min, max])", "",
                  "| method | " + " | ".join(f"{s:.0%} sparsity" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities)]
        for m in METHODS:
            cells = []
            for s in sparsities:
                v = [r[task]["acc"][f"{m}@{s:g}"] for r in results]
                cells.append(f"{np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _seed_worker(cfg, seed: int) -> dict:
    torch.set_num_threads(1)
    return {task: run_task(task, cfg, seed) for task in cfg.task_list()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="the catalog entry's quick configuration, seed 0 only")
    ap.add_argument("--set", action="append", default=[], help="config key=value (see `lmech list prune-reservoir`)")
    ap.add_argument("--out", default="results/prune-study")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one thread each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = EXPERIMENT.make_config(args.set, quick=args.quick)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_seed_worker, [cfg] * len(seeds), seeds))
    else:
        for seed in seeds:
            results.append(_seed_worker(cfg, seed))
            print(f"seed {seed} done, {time.perf_counter() - t0:.0f} s", flush=True)
    ss = cfg.sparsity_list()
    (out / "rows.json").write_text(json.dumps({"config": vars(cfg), "seeds": seeds, "results": results,
                                               "wall_s": time.perf_counter() - t0}, indent=1))
    md = table(results, ss)
    (out / "table.md").write_text(md)
    prune_figure(results, ss).savefig(out / "prune_study.png", dpi=110)
    print(md)
    return {"results": results, "table": md}


if __name__ == "__main__":
    main()
