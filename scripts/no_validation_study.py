"""Validation-free early stopping and noisy-label detection: the benchmark of docs/results/no-validation.md.

One command runs it all (resumable: each finished run is cached as JSON under ``--out``/raw):

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/no_validation_study.py --out docs/results/no-validation
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/no_validation_study.py --quick --out /tmp/nv   # seconds (CI)

Protocol: :mod:`lmech.experiments._no_validation` (tasks, training, rules, scores, retraining).
Writes ``tables.md`` (stopping, detection and retraining tables: medians and ranges over seeds),
``summary.json`` and ``figure.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmech.experiments._no_validation import (
    BASELINES,
    OURS,
    SCORES,
    make_task,
    noisy_label_study,
    recorded_run,
    score_stopping,
)

FULL = dict(settings=[("digits", 0.1), ("digits", 0.2), ("digits", 0.4), ("mnist1d", 0.1), ("mnist1d", 0.2),
                      ("mnist1d", 0.4), ("inr", 0.3), ("teacher", 0.3)],
            seeds=3, n_train=256, width=128, steps=1200, every=20, patience=10)
QUICK = dict(settings=[("digits", 0.2), ("teacher", 0.3)], seeds=1, n_train=48, width=16, steps=100, every=10,
             patience=3)
RULES = OURS + BASELINES
TARGET = 1.05


def one_run(task_name: str, q: float, seed: int, cfg: dict) -> dict:
    task = make_task(task_name, q, seed, n_train=cfg["n_train"])
    t0 = time.perf_counter()
    run = recorded_run(task, width=cfg["width"], steps=cfg["steps"], every=cfg["every"], seed=seed,
                       patience=cfg["patience"])
    t1 = time.perf_counter()
    stopping = score_stopping(run.rows, task.x.shape[0], cfg["patience"])
    labels = noisy_label_study(task, run, cfg["steps"], cfg["every"])
    return {"task": task_name, "q": q, "seed": seed, "stopping": stopping, "labels": labels, "rows": run.rows,
            "seconds_run": t1 - t0, "seconds_retrain": time.perf_counter() - t1}


def _fmt(values, digits=3) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0 or not np.isfinite(v).any():
        return "n/a"
    v = v[np.isfinite(v)]
    med = np.median(v)
    if v.size == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


def summarize(results: list[dict], cfg: dict) -> tuple[str, dict]:
    settings = [(t, q) for t, q in cfg["settings"]]
    by = {s: [r for r in results if (r["task"], r["q"]) == s] for s in settings}
    label = lambda s: f"{s[0]} q={s[1]:g}"  # noqa: E731
    lines, summary = [], {"rules": {}, "scores": {}}
    # 1. stopping: test loss at the selected step / oracle's
    lines += ["### Test loss at each rule's selected step, relative to the oracle's (median [min, max] over seeds)", "",
              "| setting | oracle test loss | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 2) + "|"]
    for s in settings:
        rs = by[s]
        cells = [_fmt([r["stopping"][k]["ratio"] for r in rs]) for k in RULES]
        lines.append(f"| {label(s)} | {_fmt([r['stopping']['oracle']['test_loss'] for r in rs])} | " + " | ".join(cells) + " |")
    lines += ["", "### Test error (0-1 error for digits/mnist1d, test loss for inr/teacher) at the selected step, "
              "relative to the error at the oracle's step", "",
              "| setting | oracle test error | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 2) + "|"]
    for s in settings:
        rs = by[s]
        cells = [_fmt([r["stopping"][k]["error_ratio"] for r in rs]) for k in RULES]
        lines.append(f"| {label(s)} | {_fmt([r['stopping']['oracle']['test_error'] for r in rs])} | " + " | ".join(cells) + " |")
    lines += ["", f"### Steps saved (of {cfg['steps']}; the step each rule halts at) and how often it fired", "",
              "| setting | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
    for s in settings:
        rs = by[s]
        cells = [f"{_fmt([r['stopping'][k]['saved'] for r in rs], 0)} ({sum(r['stopping'][k]['fired'] for r in rs)}/{len(rs)})"
                 for k in RULES]
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    lines += ["", f"### Summary: settings where the median ratio is within {100 * (TARGET - 1):.0f}% of the oracle "
              "(target: at least 80% of the settings), mean of the median ratios (target: below the evidence-based "
              "criterion's)", "", "| rule | settings within 5% | mean median ratio | mean steps saved |",
              "|---|---|---|---|"]
    for k in RULES:
        meds = [float(np.median([r["stopping"][k]["ratio"] for r in by[s]])) for s in settings]
        saved = float(np.mean([r["stopping"][k]["saved"] for r in results]))
        within = sum(m <= TARGET for m in meds)
        summary["rules"][k] = {"within": within, "of": len(settings), "mean_median_ratio": float(np.mean(meds)),
                               "median_ratios": meds, "mean_saved": saved}
        lines.append(f"| {k} | {within} / {len(settings)} | {np.mean(meds):.3f} | {saved:.0f} |")
    eb = summary["rules"]["evidence"]["mean_median_ratio"]
    met = [k for k in OURS if summary["rules"][k]["within"] >= 0.8 * len(settings)
           and summary["rules"][k]["mean_median_ratio"] < eb]
    verdict = (f"Target met by: {', '.join(met)}." if met else
               "**No criterion meets the target** (within 5% of the oracle on at least 80% of the settings and "
               "better than the evidence-based criterion on average).")
    summary["target_met_by"] = met
    lines += ["", verdict]
    # 2. detection
    lines += ["", "### AUROC for flagging the corrupted training examples (median [min, max] over seeds)", "",
              "| setting | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    for s in settings:
        cells = [_fmt([r["labels"][f"auroc_{k}"] for r in by[s]]) for k in SCORES]
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    means = {k: float(np.mean([np.median([r["labels"][f"auroc_{k}"] for r in by[s]]) for s in settings])) for k in SCORES}
    summary["scores"]["mean_median_auroc"] = means
    lines.append("| **mean** | " + " | ".join(f"**{means[k]:.3f}**" for k in SCORES) + " |")
    # 3. retraining
    drops = tuple(k for k in SCORES if k != "self-influence") + ("true-corrupted",)
    for metric, title in (("final_test_loss", "test loss at the end of retraining"),
                          ("final_test_error", "test error at the end of retraining"),
                          ("min_test_loss", "smallest test loss over retraining")):
        lines += ["", f"### Dropping each score's top |corrupted| examples and retraining: {title} (median [min, max])", "",
                  "| setting | no drop | " + " | ".join(drops) + " |", "|---" * (len(drops) + 2) + "|"]
        for s in settings:
            rs = by[s]
            base = _fmt([r["labels"][f"no_drop_{metric}"] for r in rs]) if metric != "min_test_loss" else \
                _fmt([r["stopping"]["oracle"]["test_loss"] for r in rs])
            cells = [_fmt([r["labels"][f"drop_{k}_{metric}"] for r in rs]) for k in drops]
            lines.append(f"| {label(s)} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def figure(results: list[dict], cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = cfg["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    for j, k in enumerate(RULES):
        for i, s in enumerate(settings):
            v = [r["stopping"][k]["ratio"] for r in results if (r["task"], r["q"]) == tuple(s)]
            x = i + (j - len(RULES) / 2) * 0.1
            ax.errorbar([x], [np.median(v)], yerr=[[np.median(v) - min(v)], [max(v) - np.median(v)]], fmt="o",
                        color=f"C{j}", label=k if i == 0 else None, ms=4, capsize=2)
    ax.axhline(TARGET, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(settings)), [f"{t}\nq={q:g}" for t, q in settings], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("test loss at stop / oracle's")
    ax.set_title("early stopping without validation")
    ax.legend(fontsize=7)
    ax = axes[1]
    for j, k in enumerate(SCORES):
        for i, s in enumerate(settings):
            v = [r["labels"][f"auroc_{k}"] for r in results if (r["task"], r["q"]) == tuple(s)]
            ax.plot([i + (j - 2) * 0.12] * len(v), v, "o", color=f"C{j}", ms=3, label=k if i == 0 else None)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(settings)), [f"{t}\nq={q:g}" for t, q in settings], fontsize=7)
    ax.set_ylabel("AUROC (corrupted examples)")
    ax.set_title("noisy-label detection")
    ax.legend(fontsize=7)
    ax = axes[2]
    ex = next((r for r in results if (r["task"], r["q"], r["seed"]) == ("digits", 0.2, 0)), results[0])
    steps = [row["step"] for row in ex["rows"]]
    for key, lab in (("test_loss", "test loss (clean, held out)"), ("poprisk_loo", "path-LOO estimate"),
                     ("poprisk_gcv", "path-GCV estimate"), ("channel_noise_risk", "channel-noise risk"),
                     ("loss", "training loss")):
        ax.plot(steps, [row[key] for row in ex["rows"]], label=lab)
    for j, k in enumerate(("oracle",) + RULES):
        ax.axvline(ex["stopping"][k]["selected"], color=f"C{j}", lw=0.6, ls="--")
    ax.set_xlabel("step")
    ax.set_title(f"{ex['task']} q={ex['q']:g} seed {ex['seed']}: signals (dashed: selected steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long configuration (CI)")
    p.add_argument("--out", default="docs/results/no-validation")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--shard", default=None, help="i/k: run only every k-th run starting at i (parallel workers "
                   "sharing --out); a final run without --shard aggregates the cached results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    results = []
    shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None
    jobs = [(task, q, seed) for task, q in cfg["settings"] for seed in range(cfg["seeds"])]
    for j, (task, q, seed) in enumerate(jobs):
        f = out / "raw" / f"{task}_q{q:g}_s{seed}{'_quick' if args.quick else ''}.json"
        if f.exists():
            results.append(json.loads(f.read_text()))
            continue
        if shard is not None and j % shard[1] != shard[0]:
            continue
        r = one_run(task, q, seed, cfg)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(r))
        tmp.rename(f)
        results.append(r)
        print(f"{task} q={q:g} seed {seed}: {r['seconds_run']:.0f} s + {r['seconds_retrain']:.0f} s retraining",
              flush=True)
    if shard is not None:
        return
    text, summary = summarize(results, cfg)
    (out / "tables.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"config": cfg, **summary}, indent=1))
    figure(results, cfg, out / "figure.png")
    print(text)


if __name__ == "__main__":
    main()
