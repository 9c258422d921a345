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
from lmech.experiments.figures.prune import dpo_figure


def _cell(v) -> str:
    return f"{np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if len(v) else "n/a"


KEYS = [("win_rate", "win rate vs reference"), ("clean_reward_acc", "clean reward acc."),
            ("heldout_pref_acc", "noisy held-out pref. acc."), ("implicit_reward_abs", "drift |beta log pi/pi_ref|"),
        ("policy_reward", "true reward")]


def select_by_heldout_loss(rows: list[dict]) -> list[dict]:
    """Per (arm, noise, seed), the run with the lowest DPO loss on the noisy held-out pairs (ties: smaller lr)."""
    best = {}
    for r in rows:
        key = (r["arm"], r["noise"], r["seed"])
        if key not in best or (r["heldout_loss"], r["lr"]) < (best[key]["heldout_loss"], best[key]["lr"]):
            best[key] = r
    return list(best.values())


def select_by_heldout_accuracy(rows: list[dict]) -> list[dict]:
    """Rule A, recomputed over all rows given (so merged grids select once): per (arm, noise, seed), the
    highest noisy held-out preference accuracy, ties to the smaller lr (as ``run_seed``'s ``selected``)."""
    best = {}
    for r in rows:
        key = (r["arm"], r["noise"], r["seed"])
        if key not in best or (-r["heldout_pref_acc"], r["lr"]) < (-best[key]["heldout_pref_acc"], best[key]["lr"]):
            best[key] = r
    return list(best.values())


def selected_table(sel: list[dict], noises: list[float], arms: list[str], title: str) -> list[str]:
    n_seeds = len({r["seed"] for r in sel})
    lines = [f"{title}; {n_seeds} seeds, median [min, max].", "",
             "| swapped | arm | " + " | ".join(k[1] for k in KEYS) + " | lr picked (seeds 0, 1, 2) |",
             "|---|---|" + "---|" * (len(KEYS) + 1)]
    for q in noises:
        for arm in arms:
            g = [r for r in sel if r["noise"] == q and r["arm"] == arm]
            lines.append(f"| {q:.0%} | {arm} | " + " | ".join(_cell([r[k] for r in g]) for k, _ in KEYS)
                         + " | " + ", ".join(f"{r['lr']:g}" for r in sorted(g, key=lambda r: r["seed"])) + " |")
    return lines + [""]


def table(rows: list[dict], noises: list[float], arms: list[str], lrs: list[float]) -> str:
    lines = selected_table(select_by_heldout_accuracy(rows), noises, arms,
                           "Rule A (fixed before the runs): the lr with the highest preference accuracy on the noisy "
                           "held-out pairs")
    lines += selected_table(select_by_heldout_loss(rows), noises, arms,
                            "Rule B (chosen after seeing rule A saturate): the lr with the lowest DPO loss on the noisy "
                            "held-out pairs")
    lines += ["Median over seeds for every learning rate of the grid: win rate / clean reward accuracy / drift:", "",
              "| swapped | arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for q in noises:
        for arm in arms:
            cells = []
            for lr in lrs:
                g = [r for r in rows if r["noise"] == q and r["arm"] == arm and r["lr"] == lr]
                cells.append(" / ".join(f"{np.median([r[k] for r in g]):.3f}" if g else "n/a"
                                        for k in ("win_rate", "clean_reward_acc", "implicit_reward_abs")))
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
    ap.add_argument("--from-rows", nargs="+", default=None,
                    help="re-tabulate (and merge) rows.json files of earlier runs instead of running")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.from_rows:
        rows = [r for f in args.from_rows for r in json.loads(Path(f).read_text())["rows"]]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        noises = sorted({r["noise"] for r in rows})
        arms = [a for a in ("adamw", "poprisk") if any(r["arm"] == a for r in rows)]
        md = table(rows, noises, arms, sorted({r["lr"] for r in rows}))
        (out / "table.md").write_text(md)
        dpo_figure(select_by_heldout_loss(rows), noises).savefig(out / "dpo_study_rule_b.png", dpi=110)
        print(md)
        return {"rows": rows, "table": md}
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
