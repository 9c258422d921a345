"""The measurements behind docs/results/poprisk.md (PopRiskAdamW vs AdamW vs Grokfast).

    python scripts/poprisk_study.py PART [PART ...] [--out runs/poprisk] [--workers 2]

Parts (each resumable: finished runs are found in the store and skipped):

* ``inr``            lmech compare on inr-noise (4 arms, lr x wd grid, 3 evaluation seeds)
* ``pinn``           lmech compare on pinn-advection (3 arms, lr grid, 3 evaluation seeds)
* ``grokking-mlp``   lmech compare on grokking, MLP, a+b mod 97, 30% (4 arms, lr x wd grid, 3 seeds)
* ``ablations``      the open points: warm-up and gated weight decay (grokking MLP, INR, PINN)
* ``proxy``          EMA proxy s_hat vs the exact leave-one-out term on grokking-MLP checkpoints
* ``transformer``    the paper's setting (a/b mod 97, 25%, 2-layer transformer), one seed per arm
* ``report``         write docs/results/poprisk.md and its figures from what the store holds

Every run uses one torch thread; ``--workers`` (default 2) runs go at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results"

GROK_MLP = {"model": "mlp", "op": "+", "p": 97, "train_fraction": 0.3, "steps": 20000, "patience": 500}
GROK_TRANSFORMER = {"steps": 30000, "patience": 500}
PINN = {"steps": 3000, "eval_every": 25, "stop_at_target": True}
INR: dict = {}

COMPARISONS = {
    "inr": dict(
        experiment="inr-noise", sets=INR,
        arms={"adamw": {"optimizer": "adamw"},
              "grokfast": {"optimizer": "grokfast"},
              "poprisk-soft": {"optimizer": "poprisk", "gate": "soft", "alpha": "fresh"},
              "poprisk-snr-finite": {"optimizer": "poprisk", "gate": "snr", "alpha": "finite"}},
        grid={"lr": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [0.0, 0.1]}),
    "pinn": dict(
        experiment="pinn-advection", sets=PINN,
        arms={"adamw": {"optimizer": "adamw"},
              "poprisk-soft": {"optimizer": "poprisk", "gate": "soft", "alpha": "fresh"},
              "poprisk-snr": {"optimizer": "poprisk", "gate": "snr", "alpha": "fresh"}},
        grid={"lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}),
    "grokking-mlp": dict(
        experiment="grokking", sets=GROK_MLP,
        arms={"adamw": {"optimizer": "adamw"},
              "grokfast": {"optimizer": "grokfast"},
              "poprisk-soft": {"optimizer": "poprisk", "gate": "soft", "alpha": "fresh"},
              "poprisk-snr-finite": {"optimizer": "poprisk", "gate": "snr", "alpha": "finite"}},
        grid={"lr": [1e-3, 3e-3], "weight_decay": [0.1, 1.0]}),
}

# The open points of Algorithm 1 (research notes 2.4), one sweep each, PopRiskAdamW only.
ABLATIONS = {
    "ablation-grok-wd": dict(experiment="grokking", sets={**GROK_MLP, "optimizer": "poprisk", "lr": 3e-3,
                                                          "weight_decay": 1.0},
                             grid={"gate": ["soft", "snr"], "alpha": ["fresh", "finite"],
                                   "gate_weight_decay": [False, True]}, seeds=[0]),
    "ablation-grok-tensor": dict(experiment="grokking", sets={**GROK_MLP, "optimizer": "poprisk", "lr": 3e-3,
                                                              "weight_decay": 1.0, "reduction": "tensor"},
                                 grid={"gate": ["soft", "snr"]}, seeds=[0]),
    "ablation-grok-lr": dict(experiment="grokking", sets={**GROK_MLP, "optimizer": "poprisk", "weight_decay": 1.0},
                             grid={"gate": ["soft", "snr"], "alpha": ["fresh", "finite"], "lr": [1e-2, 3e-2]},
                             seeds=[0]),
    "ablation-warmup-inr": dict(experiment="inr-noise", sets={**INR, "optimizer": "poprisk", "lr": 1e-3},
                                grid={"gate": ["soft", "snr"], "gate_warmup": [0, 100]}, seeds=[0, 1, 2]),
    "ablation-warmup-pinn": dict(experiment="pinn-advection", sets={**PINN, "optimizer": "poprisk", "lr": 1e-3},
                                 grid={"gate": ["soft", "snr"], "gate_warmup": [0, 100]}, seeds=[0, 1, 2]),
}

# other result keys worth a median in the report (over the evaluation seeds)
EXTRA_MEDIANS = {"inr-noise": ["min_clean_mse", "final_train_mse"], "pinn-advection": [],
                 "grokking": ["step_to_99"]}

# One sweep over the optimizer (the gate keys only act for optimizer=poprisk), so that two runs go at once.
TRANSFORMER = dict(sets={**GROK_TRANSFORMER, "gate": "snr", "alpha": "finite"},
                   grid={"optimizer": ["adamw", "poprisk", "grokfast"]}, seeds=[0])


def run_comparison(key: str, out: Path, workers: int):
    from lmech.compare import compare

    spec = COMPARISONS[key]
    return compare(spec["experiment"], spec["arms"], spec["grid"], sets=spec["sets"], seeds=3, tune_seed=0,
                   out=out, workers=workers, name=f"poprisk-{key}")


def run_ablations(out: Path, workers: int) -> None:
    from lmech.sweeps import run_sweep

    for name, spec in ABLATIONS.items():
        run_sweep(spec["experiment"], sets=spec["sets"], grid=spec["grid"], seeds=spec["seeds"], workers=workers,
                  out=out, name=name)


def run_transformer(out: Path, workers: int) -> None:
    from lmech.sweeps import run_sweep

    run_sweep("grokking", sets=TRANSFORMER["sets"], grid=TRANSFORMER["grid"], seeds=TRANSFORMER["seeds"],
              workers=workers, out=out, name="transformer")


def run_proxy(out: Path) -> None:
    """Train the grokking MLP with PopRiskAdamW(gate='none') (so training is AdamW's) and, at checkpoints,
    compare s_hat with the exact leave-one-out term on 4 fresh training batches of 512."""
    import torch

    from lmech.experiments.grokking import GrokkingConfig, build, cross_entropy
    from lmech.optim import PopRiskAdamW
    from lmech.optim.poprisk_exact import compare_noise_proxy
    from lmech.train import minibatches

    torch.set_num_threads(1)
    cfg = GrokkingConfig(**{k: v for k, v in GROK_MLP.items() if k not in ("steps", "patience")})
    data, model = build(cfg, seed=0)
    rows = []
    for beta1 in (0.9,):
        data, model = build(cfg, seed=0)
        opt = PopRiskAdamW(model.parameters(), lr=3e-3, betas=(beta1, 0.98), weight_decay=1.0, gate="none",
                           alpha="finite", batch_size=512, dataset_size=data.n_train)
        gen = torch.Generator().manual_seed(0)
        batches = minibatches(data.n_train, 512, gen)
        probe = torch.Generator().manual_seed(1)
        checkpoints = {50, 200, 500, 1000, 2000, 4000, 8000}
        for step in range(1, max(checkpoints) + 1):
            idx = next(batches)
            opt.zero_grad()
            cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            if step in checkpoints:
                stats = []
                for _ in range(4):
                    pidx = torch.randperm(data.n_train, generator=probe)[:512]
                    stats.append(compare_noise_proxy(opt, model, cross_entropy, data.x_train[pidx], data.y_train[pidx]))
                row = {"step": step, "beta1": beta1}
                for k in stats[0]:
                    row[k] = sum(s[k] for s in stats) / len(stats)
                row.update({f"diag_{k}": v for k, v in opt.diagnostics().items() if k != "step"})
                rows.append(row)
                print(json.dumps(row), flush=True)
    n, b = data.n_train, 512
    result = {"rows": rows, "n_train": n, "batch_size": b,
              "predicted_noise_ratio": (n - b) / (n - 1) * 2 / (1 + 0.9)}
    path = out / "proxy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "not reached"
        return str(int(v)) if v.is_integer() and abs(v) < 1e9 else f"{v:.4g}"
    return str(v)


def _table(df, cols) -> str:
    from lmech.contract.tables import markdown_table

    return markdown_table(cols, ([row.get(c) for c in cols] for row in df.to_dict("records")), _fmt)


def comparison_section(key: str, out: Path) -> str:
    import pandas as pd

    d = out / "compare" / f"poprisk-{key}"
    if not (d / "table.csv").exists():
        return f"*not run yet: `python scripts/poprisk_study.py {key}`*\n"
    spec = COMPARISONS[key]
    table = pd.read_csv(d / "table.csv")
    tuning = pd.read_csv(d / "tuning.csv")
    shutil.copy(d / "comparison.png", DOCS / f"poprisk-{key}.png")
    metric = [c for c in table.columns if c.startswith("median ")][0][len("median "):]
    grid_keys = list(spec["grid"])
    evaluation = pd.read_csv(d / "evaluation.csv")
    for extra in EXTRA_MEDIANS.get(spec["experiment"], []):
        if extra in evaluation.columns and f"median {extra}" not in table.columns:
            table[f"median {extra}"] = [evaluation.loc[evaluation["arm"] == a, extra].median() for a in table["arm"]]
    text = [_table(table, [c for c in table.columns]), "",
            f"![{key}](poprisk-{key}.png)", "",
            f"Tuning runs (seed 0): `{metric}` per grid point (columns: learning rate):", "",
            _pivot(tuning, grid_keys, metric), ""]
    if "final_test_acc" in tuning.columns:
        text += ["Final held-out accuracy of the tuning runs:", "", _pivot(tuning, grid_keys, "final_test_acc"), ""]
    return "\n".join(text)


def _pivot(tuning, grid_keys: list[str], value: str) -> str:
    """arm (x other grid keys) by learning rate."""
    import pandas as pd

    rows = [k for k in grid_keys if k != "lr"]
    df = tuning.copy()
    df[value] = [None if s != "done" else v for s, v in zip(df["state"], df[value])]
    table = df.pivot_table(index=["arm", *rows], columns="lr", values=value, aggfunc="first", dropna=False,
                           sort=False)
    table = table.reset_index()
    table.columns = [c if isinstance(c, str) else f"lr {c:g}" for c in table.columns]
    table = table.astype(object).where(pd.notna(table), None)
    return _table(table, list(table.columns))


def sweep_section(name: str, out: Path, cols: list[str], last: tuple[str, ...] = ()) -> str:
    """A sweep's runs: grid values, seed, state, result keys ``cols`` and the last logged value of ``last``."""
    from lmech.errors import ConfigError
    from lmech.runs import RunStore
    from lmech.sweeps import summary

    try:
        df = summary(name, out=out)
    except ConfigError:
        return "*not run yet: `python scripts/poprisk_study.py ablations`*\n"
    store = RunStore(out)
    for key in last:
        values = []
        for run_id, state in zip(df["run_id"], df["state"]):
            m = store.metrics(run_id, wide=True) if state in ("done", "diverged") else None
            values.append(float(m[key].dropna().iloc[-1]) if m is not None and key in m.columns else None)
        df[f"last {key}"] = values
    grid = list(ABLATIONS[name]["grid"]) if name in ABLATIONS else list(TRANSFORMER["grid"])
    present = [c for c in cols if c in df.columns] + [f"last {k}" for k in last]
    return _table(df, [*grid, "seed", "state", *present]) + "\n"


CURVE_PANELS = (("test_acc", "held-out accuracy"), ("train_acc", "train accuracy"),
                ("weight_norm", "weight norm ||w||"), ("gate_mean", "mean gate q"))


def curve_panels(store, curves: list[tuple[str, str, str, str]], title: str, name: str, log: bool) -> str:
    """One row of the four CURVE_PANELS for runs ``(label, run_id, color, linestyle)``, saved as
    ``docs/results/<name>.png``; ``log``: log-scaled step axis and gate axis."""
    from lmech.plotting import plt

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(18, 3.8))
    for label, run_id, color, ls in curves:
        m = store.metrics(run_id, wide=True)
        m = m[m["step"] > 0]
        for ax, (key, _) in zip(axes, CURVE_PANELS):
            if key in m.columns:
                d = m[["step", key]].dropna()
                ax.plot(d["step"], d[key], color=color, ls=ls, lw=1.2 if log else 1.0, label=label)
    for ax, (_, panel) in zip(axes, CURVE_PANELS):
        ax.set(xlabel="step", title=panel, xscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    if log:
        axes[-1].set_yscale("log")
    axes[0].legend(fontsize=7 if log else 8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(DOCS / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{name}]({name}.png)"


def mechanism_figure(out: Path) -> str:
    """Grokking MLP at lr 3e-3, wd 1: AdamW and the PopRiskAdamW ablation runs, curves side by side."""
    from lmech.errors import ConfigError
    from lmech.runs import RunStore
    from lmech.sweeps import summary

    try:
        runs = summary("ablation-grok-wd", out=out).to_dict("records")
        tuned = summary("poprisk-grokking-mlp.adamw.tune", out=out).to_dict("records")
    except ConfigError:
        return "*not run yet*"
    adamw = [r for r in tuned if r["lr"] == 3e-3 and r["weight_decay"] == 1.0]
    curves = [("AdamW", adamw[0]["run_id"], "black", "-")] if adamw else []
    colors = {("soft", "fresh"): "tab:red", ("soft", "finite"): "tab:orange", ("snr", "fresh"): "tab:blue",
              ("snr", "finite"): "tab:green"}
    for r in runs:
        if r["state"] not in ("done", "diverged"):
            continue
        label = f"{r['gate']}, alpha {r['alpha']}, wd {'gated' if r['gate_weight_decay'] else 'ungated'}"
        curves.append((label, r["run_id"], colors[(r["gate"], r["alpha"])], "--" if r["gate_weight_decay"] else "-"))
    return curve_panels(RunStore(out), curves, "grokking MLP, a+b mod 97, 30% train, lr 3e-3, weight decay 1.0, seed 0",
                        "poprisk-grokking-mechanism", log=True)


GROK_LAST = ("train_acc", "weight_norm", "gate_mean", "gate_closed_fraction")


def write_report(out: Path) -> Path:
    DOCS.mkdir(parents=True, exist_ok=True)
    template = (ROOT / "scripts" / "poprisk_report.md").read_text()
    sections = {
        "INR_TABLE": comparison_section("inr", out),
        "PINN_TABLE": comparison_section("pinn", out),
        "GROK_MLP_TABLE": comparison_section("grokking-mlp", out),
        "ABLATION_GROK_WD": sweep_section("ablation-grok-wd", out, ["step_to_95", "final_test_acc"], GROK_LAST),
        "ABLATION_GROK_LR": sweep_section("ablation-grok-lr", out, ["step_to_95", "final_test_acc"], GROK_LAST),
        "ABLATION_GROK_TENSOR": sweep_section("ablation-grok-tensor", out, ["step_to_95", "final_test_acc"],
                                              GROK_LAST),
        "ABLATION_WARMUP_INR": sweep_section("ablation-warmup-inr", out, ["final_clean_mse", "min_clean_mse"]),
        "ABLATION_WARMUP_PINN": sweep_section("ablation-warmup-pinn", out, ["step_to_target", "min_rel_l2"]),
        "PROXY_TABLE": proxy_section(out),
        "MECHANISM_FIGURE": mechanism_figure(out),
        "TRANSFORMER_TABLE": transformer_section(out),
        "GROKKING_PAPER_TABLE": grokking_paper_section(),
    }
    text = template
    for key, value in sections.items():
        text = text.replace("{{" + key + "}}", value)
    path = DOCS / "poprisk.md"
    path.write_text(text)
    return path


def grokking_paper_section() -> str:
    """The paper-setting sweep over seeds (its own store, results/grokking-paper; scripts/grokking_paper.sh)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from grokking_paper_table import table

    return table(str(ROOT / "results" / "grokking-paper"))


def proxy_section(out: Path) -> str:
    path = out / "proxy.json"
    if not path.exists():
        return "*not run yet: `python scripts/poprisk_study.py proxy`*\n"
    import pandas as pd

    data = json.loads(path.read_text())
    df = pd.DataFrame(data["rows"])
    return (_table(df, ["step", "noise_ratio", "median_ratio", "log_corr", "gate_agreement", "pop_descent_proxy",
                        "pop_descent_exact", "diag_gate_mean"])
            + f"\n\nPredicted `noise_ratio` for stationary gradients: (n-b)/(n-1) * 2/(1+beta1) = "
              f"{data['predicted_noise_ratio']:.3f} (n = {data['n_train']}, b = {data['batch_size']}).\n")


def transformer_section(out: Path) -> str:
    table = sweep_section("transformer", out, ["step_to_95", "step_to_99", "final_test_acc", "steps_run",
                                               "wall_time_s"], ("train_acc", "gate_mean"))
    return table + "\n" + transformer_figure(out)


def transformer_figure(out: Path) -> str:
    """Held-out and training accuracy, weight norm and mean gate of the transformer runs, by step."""
    from lmech.errors import ConfigError
    from lmech.runs import RunStore
    from lmech.sweeps import summary

    try:
        runs = summary("transformer", out=out).to_dict("records")
    except ConfigError:
        return ""
    colors = {"adamw": "black", "poprisk": "tab:green", "grokfast": "tab:purple"}
    curves = [(f"{r['optimizer']} ({r['state']})", r["run_id"], colors.get(r["optimizer"], "gray"), "-")
              for r in runs if r["state"] in ("done", "diverged", "incomplete", "running")]
    return curve_panels(RunStore(out), curves, "a/b mod 97, 25% train, 2-layer transformer, lr 1e-3, weight decay 1.0, "
                        "seed 0", "poprisk-transformer", log=False) + "\n"


def main(argv=None) -> None:
    parts = ["inr", "pinn", "grokking-mlp", "ablations", "proxy", "transformer", "report"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=parts + ["all"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "poprisk")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    todo = parts if "all" in args.parts else args.parts
    for part in todo:
        print(f"== {part}", flush=True)
        if part in COMPARISONS:
            result = run_comparison(part, args.out, args.workers)
            print(result.markdown(), flush=True)
        elif part == "ablations":
            run_ablations(args.out, args.workers)
        elif part == "proxy":
            run_proxy(args.out)
        elif part == "transformer":
            run_transformer(args.out, args.workers)
        elif part == "report":
            print(write_report(args.out))


if __name__ == "__main__":
    sys.exit(main())
