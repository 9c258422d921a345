"""The table of the paper-setting grokking sweep (scripts/grokking_paper.sh): per arm, the median
step to 95% held-out accuracy with a bootstrap interval, the speed-up against AdamW with its
interval, and the final accuracies, over the seeds that finished.

    python scripts/grokking_paper_table.py [--out results/grokking-paper]

A run that never reached 95% within the cap counts as the cap (censored), so medians and speed-ups
that involve censored runs are bounds (marked ">" / "<"). The interval is the 2.5-97.5 percentile
of 10,000 bootstrap resamples of each arm's seeds (independently per arm for the ratio).
"""

from __future__ import annotations

import argparse

import numpy as np

ARMS = {  # label -> the sweep point's parameters
    "AdamW": {"optimizer": "adamw"},
    "Grokfast (EMA 0.98, lambda 2)": {"optimizer": "grokfast"},
    "PopRiskAdamW soft, alpha 1 (as published)": {"optimizer": "poprisk", "gate": "soft", "alpha": 1.0},
    "PopRiskAdamW snr, alpha b/(n-b) (official default)": {"optimizer": "poprisk", "gate": "snr", "alpha": "finite",
                                                           "gate_warmup": None},
    "PopRiskAdamW snr, alpha b/(n-b), gate warm-up 32": {"optimizer": "poprisk", "gate": "snr", "alpha": "finite",
                                                         "gate_warmup": 32},
}
CAP = 60_000


def _select(df, params: dict):
    mask = np.ones(len(df), dtype=bool)
    for key, value in params.items():
        column = df[key] if key in df else None
        if value is None:
            mask &= column.isna().to_numpy() if column is not None else mask
        else:
            mask &= (column == value).to_numpy() if column is not None else False
    return df[mask]


def _steps(rows) -> np.ndarray:
    values = rows["step_to_95"] if "step_to_95" in rows else []
    return np.array([CAP if s is None or s != s else float(s) for s in values], dtype=float)


def _bootstrap(samples: list[np.ndarray], stat, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = [stat(*(s[rng.integers(0, len(s), len(s))] for s in samples)) for _ in range(n)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _fmt(value: float, censored: bool) -> str:
    return (">" if censored else "") + f"{value:,.0f}"


def table(out: str) -> str:
    from lmech.sweeps import summary

    df = summary("grokking-paper", out=out)
    return table_from_frame(df) + "\n\n" + unfinished(df, out)


def unfinished(df, out: str) -> str:
    """A line per started but unfinished run: its arm, seed, last logged step and held-out accuracy
    (from its folder, or from the newest earlier attempt that a restart moved aside)."""
    from lmech.runs import RunStore

    store = RunStore(out)
    lines = []
    for row in df[df["state"] != "done"].itertuples():
        folders = [store.root / row.run_id] + store.attempts(row.run_id)
        folder = next((f for f in folders if (f / "config.json").exists()), None)
        if folder is None:
            continue
        metrics = store.metrics(folder, wide=True)
        if metrics.empty or "test_acc" not in metrics:
            continue
        last = metrics.dropna(subset=["test_acc"]).iloc[-1]
        arm = next((label for label, params in ARMS.items() if len(_select(df[df["run_id"] == row.run_id], params))),
                   "?")
        lines.append(f"* {arm}, seed {row.seed}: {row.state if folder.name == row.run_id else 'interrupted'} at step "
                     f"{int(last['step']):,}, held-out accuracy {float(last['test_acc']):.3f}")
    return ("Started, not finished (the sweep continues them from their last checkpoint):\n\n" + "\n".join(lines)
            if lines else "")


def table_from_frame(df) -> str:
    """The markdown table from a sweep summary frame (one row per run, grid values as columns)."""
    done = df[df["state"] == "done"]
    base = _steps(_select(done, ARMS["AdamW"]))
    lines = ["| arm | seeds done | step to 95% (median) | 95% interval | speed-up vs AdamW (median ratio) | 95% interval "
             "| final held-out accuracy (median, min-max) | runs that reached 95% |",
             "|---|---|---|---|---|---|---|---|"]
    for label, params in ARMS.items():
        rows = _select(done, params)
        if rows.empty:
            lines.append(f"| {label} | 0 | - | - | - | - | - | - |")
            continue
        steps = _steps(rows)
        med = float(np.median(steps))
        censored = med >= CAP
        lo, hi = _bootstrap([steps], np.median) if len(steps) > 1 else (med, med)
        if len(base) and label != "AdamW":
            ratio = float(np.median(base) / med)
            rlo, rhi = (_bootstrap([base, steps], lambda a, b: np.median(a) / np.median(b))
                        if len(base) > 1 and len(steps) > 1 else (ratio, ratio))
            bound = ">" if np.median(base) >= CAP else "<" if censored else ""
            speed = f"{bound}{ratio:.2f}x"
            speed_ci = f"{bound}{rlo:.2f} to {rhi:.2f}"
        else:
            speed = speed_ci = "-"
        acc = rows["final_test_acc"].astype(float)
        seeds = ", ".join(str(int(s)) for s in sorted(rows["seed"]))
        lines.append(f"| {label} | {len(rows)} ({seeds}) | {_fmt(med, censored)} | {_fmt(lo, lo >= CAP)} to "
                     f"{_fmt(hi, hi >= CAP)} | {speed} | {speed_ci} | {acc.median():.3f} ({acc.min():.3f}-{acc.max():.3f}) "
                     f"| {int((steps < CAP).sum())} of {len(steps)} |")
    states = df["state"].value_counts().to_dict()
    lines.append("")
    lines.append(f"Runs in the sweep: {len(df)} ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/grokking-paper")
    print(table(parser.parse_args().out))


if __name__ == "__main__":
    main()
