"""DPO under 0/10/30% swapped preferences, AdamW vs PopRiskAdamW, equal lr grids, 3 seeds (issue 14 item 4).

One command:  PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/dpo_study.py --out results/dpo-study
CI:           python scripts/dpo_study.py --quick --out /tmp/x   (the catalog entry's quick config, 1 seed)

Writes ``rows.json`` (every run: seed, noise, arm, lr, metrics, ``selected``), ``table.md`` (for the
learning rate the held-out rule picked per arm, noise and seed: median [min, max] over seeds of the win
rate against the reference, clean reward accuracy and drift; then every lr's median win rate) and
``dpo_study.png``. The runs are :func:`lmech.experiments.dpo_noisy.run_seed`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmech.experiments.dpo_noisy import EXPERIMENT, run_seed
from lmech.report.prune import dpo_figure


def _cell(v) -> str:
    return f"{np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if len(v) else "n/a"


def table(rows: list[dict], noises: list[float], arms: list[str], lrs: list[float]) -> str:
    sel = [r for r in rows if r["selected"]]
    n_seeds = len({r["seed"] for r in rows})
    keys = [("win_rate", "win rate vs reference"), ("clean_reward_acc", "clean reward acc."),
            ("heldout_pref_acc", "noisy held-out pref. acc."), ("implicit_reward_abs", "drift |beta log pi/pi_ref|"),
            ("policy_reward", "true reward")]
    lines = [f"Selected learning rate per (arm, noise, seed) by noisy held-out preference accuracy; "
             f"{n_seeds} seeds, median [min, max].", "",
             "| swapped | arm | " + " | ".join(k[1] for k in keys) + " | lr picked |",
             "|---|---|" + "---|" * (len(keys) + 1)]
    for q in noises:
        for arm in arms:
            g = [r for r in sel if r["noise"] == q and r["arm"] == arm]
            lines.append(f"| {q:.0%} | {arm} | " + " | ".join(_cell([r[k] for r in g]) for k, _ in keys)
                         + " | " + ", ".join(f"{r['lr']:g}" for r in sorted(g, key=lambda r: r["seed"])) + " |")
    lines += ["", "Median win rate over seeds for every learning rate of the grid:", "",
              "| swapped | arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for q in noises:
        for arm in arms:
            cells = [_cell([r["win_rate"] for r in rows if r["noise"] == q and r["arm"] == arm and r["lr"] == lr])
                     for lr in lrs]
            lines.append(f"| {q:.0%} | {arm} | " + " | ".join(cells) + " |")
    reference = [r["reference_reward"] for r in rows if r["arm"] == arms[0] and r["lr"] == lrs[0]]
    lines += ["", f"Reference policy's mean true reward: {_cell(reference)}.", ""]
    return "\n".join(lines)


def _seed_worker(cfg, seed: int) -> list[dict]:
    torch.set_num_threads(1)
    return run_seed(cfg, seed)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="the catalog entry's quick configuration, seed 0 only")
    ap.add_argument("--set", action="append", default=[], help="config key=value (see `lmech list dpo-noisy`)")
    ap.add_argument("--out", default="results/dpo-study")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one thread each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = EXPERIMENT.make_config(args.set, quick=args.quick)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()

    def progress(r):
        print(f"seed {r['seed']} q={r['noise']:g} {r['arm']} lr={r['lr']:g}: win {r['win_rate']:.3f}, "
              f"held-out acc {r['heldout_pref_acc']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
            for seed_rows in pool.map(_seed_worker, [cfg] * len(seeds), seeds):
                rows.extend(seed_rows)
                print(f"seed {seed_rows[0]['seed']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        for seed in seeds:
            rows.extend(run_seed(cfg, seed, on_run=progress))
    (out / "rows.json").write_text(json.dumps({"config": vars(cfg), "seeds": seeds, "rows": rows,
                                               "wall_s": time.perf_counter() - t0}, indent=1))
    md = table(rows, cfg.noise_list(), cfg.arm_list(), cfg.lr_list())
    (out / "table.md").write_text(md)
    dpo_figure([r for r in rows if r["selected"]], cfg.noise_list()).savefig(out / "dpo_study.png", dpi=110)
    print(md)
    return {"rows": rows, "table": md}


if __name__ == "__main__":
    main()
