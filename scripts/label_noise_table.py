"""The label-noise study: the ``label-noise`` entry over noise levels q (a resumable sweep), its
table (markdown) and figure, as in docs/results/signal-reservoir.md.

    python scripts/label_noise_table.py --out runs --docs docs/results/label-noise

(Moved here from ``python -m lmech.experiments.label_noise``: catalog entries run once; studies
over many runs sit above the executors.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def noise_table(qs=(0.0, 0.1, 0.2, 0.3, 0.4), sets: dict | None = None, seeds: int = 1, out: str | Path = "runs",
                workers: int = 1, quick: bool = False):
    """Run ``label-noise`` for every noise level in ``qs`` (a resumable sweep) and return the table:
    one row per run with the noise reservoir fractions, test error, the population-risk estimates'
    final levels and correlations with the held-out loss (leave-one-out, GCV and the U-statistic
    reconstruction; the training loss's correlation for comparison), the channel noise energy and
    the coupling."""
    from lmech.sweeps import run_sweep

    df = run_sweep("label-noise", sets=dict(sets or {}), grid={"noise": list(qs)}, seeds=seeds, workers=workers,
                   out=out, quick=quick, progress=False)
    keep = ["noise", "seed", "state", "final_test_error", "min_test_error", "final_train_error",
            "noise_reservoir_fraction_first", "noise_reservoir_fraction_final", "signal_reservoir_fraction_final",
            "noise_channel_final", "noise_transfer_final", "final_heldout_noisy_loss", "poprisk_loo_final",
            "poprisk_gcv_final", "poprisk_ustat_final", "poprisk_loo_corr_heldout", "poprisk_gcv_corr_heldout",
            "poprisk_ustat_corr_heldout", "train_loss_corr_heldout", "coupling_corr", "run_id"]
    return df[[c for c in keep if c in df.columns]].sort_values(["noise", "seed"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    """``python scripts/label_noise_table.py [--qs 0,0.1,...] [--set k=v] [--quick] --out runs
    --docs docs/results``: the table over q (markdown) and its figure."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--qs", default="0,0.1,0.2,0.3,0.4")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--docs", default=None, help="folder for label_noise_table.md and label_noise_table.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sets = dict(s.split("=", 1) for s in args.sets)
    df = noise_table([float(q) for q in args.qs.split(",")], sets, args.seeds, args.out, args.workers, args.quick)
    from lmech.report.signal_reservoir import markdown_table

    text = markdown_table(df.drop(columns=["run_id"]))
    print(text)
    if args.docs:
        from lmech.experiments.figures.signal_reservoir import noise_table_figure
        from lmech.runs import RunStore

        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "label_noise_table.md").write_text(text + "\n")
        store = RunStore(Path(args.out))
        curves = {float(r.noise): store.metrics(r.run_id, wide=True) for r in df.itertuples()}
        noise_table_figure(df, curves).savefig(docs / "label_noise_table.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
