"""Fair optimizer comparisons: equal tuning budget per arm, then the best setting of each on fresh seeds.

>>> from lmech.compare import compare
>>> result = compare("inr-noise", arms={"adamw": {"optimizer": "adamw"},
...                                     "poprisk": {"optimizer": "poprisk", "alpha": "finite"}},
...                  grid={"lr": [3e-4, 1e-3, 3e-3]}, seeds=3, out="runs", workers=2)  # doctest: +SKIP
>>> print(result.markdown())                                                          # doctest: +SKIP

Protocol (DESIGN.md, "Fair comparisons"):

1. **Tuning.** Every arm runs the same ``grid`` (e.g. learning rate x weight decay) on one seed,
   ``tune_seed``; an arm is its fixed config keys (``arms[name]``) on top of the shared ``sets``.
2. **Selection.** Each arm's best grid point is the one with the best ``metric`` (``mode`` min or
   max). Runs where the metric is missing (e.g. ``step_to_95`` is ``None``: never reached) rank
   after every run that has it, and among themselves by ``tiebreak`` (e.g. final accuracy); failed
   or diverged runs rank last. Ties keep grid order.
3. **Evaluation.** The best setting of each arm runs on ``seeds`` fresh seeds (``tune_seed + 1``
   ... ``tune_seed + seeds``, so the seed used for selection is not reused for the estimate).
4. **Report.** Per arm: the chosen setting, the median and range (min, max) of the metric over the
   evaluation seeds, how many reached it, and the tiebreak's median; plus a figure (learning curves
   of the evaluation runs, and the metric per seed). A missing value counts as +inf (mode min) or
   -inf (mode max) in the median, so "not reached" is shown when more than half never reached it.

All runs go through :func:`lmech.sweeps.run_sweep` (sweeps ``<name>.<arm>.tune`` and
``<name>.<arm>.eval`` in the run store), so an interrupted comparison resumes where it stopped and
runs shared with other sweeps are not repeated. Outputs: ``<out>/compare/<name>/`` with
``table.md``, ``table.csv``, ``tuning.csv``, ``evaluation.csv`` and ``comparison.png``.

Defaults per experiment (``GOALS``): grokking ``step_to_95`` (min; tiebreak ``final_test_acc``
max), inr-noise ``final_clean_mse`` (min), pinn-advection ``step_to_target`` (min; tiebreak
``min_rel_l2`` min).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmech.contract import tables
from lmech.contract.spec import parse_grid, parse_sets, validate_seed
from lmech.errors import ConfigError


@dataclass(frozen=True)
class Goal:
    """What "best" means: a result key, its direction, and what ranks runs that lack it."""

    metric: str
    mode: str = "min"
    tiebreak: str | None = None
    tiebreak_mode: str = "max"
    curve: str | None = None  # metrics column plotted against step in the figure


GOALS: dict[str, Goal] = {
    "grokking": Goal("step_to_95", "min", "final_test_acc", "max", curve="test_acc"),
    "inr-noise": Goal("final_clean_mse", "min", None, "min", curve="clean_mse"),
    "pinn-advection": Goal("step_to_target", "min", "min_rel_l2", "min", curve="rel_l2"),
}

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


@dataclass
class Comparison:
    """The outcome of :func:`compare`: tables (pandas) and where they were written."""

    name: str
    experiment: str
    goal: Goal
    table: Any          # one row per arm
    tuning: Any         # one row per (arm, grid point) on the tuning seed
    evaluation: Any     # one row per (arm, seed) of the best setting
    directory: Path
    figure: Path | None = None
    grid_keys: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The per-arm table as Markdown (what ``table.md`` holds)."""
        return markdown_table(self.table)


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``"poprisk:optimizer=poprisk,gate=soft"`` -> ``("poprisk", {"optimizer": "poprisk", "gate": "soft"})``."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not ARM_NAME.match(name):
        raise ConfigError(f"--arm {text!r} is not NAME:key=value,key=value (NAME: letters, digits, '_' or '-'), "
                          "e.g. --arm poprisk:optimizer=poprisk,gate=soft")
    sets: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--arm {name}: {item!r} is not key=value")
        sets[key.strip()] = value.strip()
    return name, sets


def _score(row: dict, goal: Goal) -> tuple:
    """Sort key, smaller is better: (class, value, tiebreak); class 0 = metric present, 1 = absent, 2 = failed."""
    if row.get("state") not in ("done",):
        return (2, 0.0, 0.0)
    tb = _num(row.get(goal.tiebreak)) if goal.tiebreak else None
    tb_key = 0.0 if tb is None else (tb if goal.tiebreak_mode == "min" else -tb)
    value = _num(row.get(goal.metric))
    if value is None:
        return (1, 0.0, tb_key)
    return (0, value if goal.mode == "min" else -value, tb_key)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _median_range(values: list[float | None], mode: str) -> tuple[float, float, float]:
    """Median, min, max with missing values as +inf (mode min) or -inf (mode max)."""
    import numpy as np

    fill = math.inf if mode == "min" else -math.inf
    arr = np.array([fill if v is None else v for v in values], dtype=float)
    return float(np.median(arr)), float(arr.min()), float(arr.max())


def compare(experiment: str, arms: dict[str, dict], grid: dict[str, list], sets: dict | None = None,
            seeds: int = 3, tune_seed: int = 0, metric: str | None = None, mode: str | None = None,
            tiebreak: str | None = None, out: str | Path = "runs", workers: int | None = 2,
            name: str | None = None, quick: bool = False, progress: bool = True) -> Comparison:
    """Tune every arm on the same grid (one seed), evaluate each arm's best on ``seeds`` fresh seeds.

    ``arms`` maps an arm's name to its fixed config keys (``{"adamw": {"optimizer": "adamw"}}``);
    ``grid`` the shared tuning grid; ``sets`` config keys shared by all arms. ``metric``/``mode``/
    ``tiebreak`` default to ``GOALS[experiment]``. See the module docstring for the protocol.
    """
    import pandas as pd

    from lmech import experiments
    from lmech.sweeps import plan_sweep, run_sweep

    experiments.get(experiment)  # a bad name is a ConfigError before anything runs
    goal = _goal(experiment, metric, mode, tiebreak)
    if not arms:
        raise ConfigError("give at least one arm (e.g. --arm adamw:optimizer=adamw)")
    bad = [a for a in arms if not ARM_NAME.match(a)]
    if bad:
        raise ConfigError(f"bad arm name(s) {bad}: use letters, digits, '_' or '-' (at most 40)")
    if not grid:
        raise ConfigError("give a tuning grid (e.g. --grid lr=1e-3,3e-3 --grid weight_decay=0.1,1)")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive number of evaluation seeds, got {seeds!r}")
    validate_seed(tune_seed)
    validate_seed(tune_seed + seeds)  # the largest seed it runs
    sets = dict(sets or {})
    overlap = {a: sorted(set(s) & set(grid)) for a, s in arms.items() if set(s) & set(grid)}
    if overlap:
        raise ConfigError(f"arm keys also in the grid: {overlap}; an arm fixes a key or the grid tunes it, not both")
    name = name or f"compare-{experiment}-{_digest(experiment, arms, grid, sets, quick, tune_seed)}"
    eval_seeds = list(range(tune_seed + 1, tune_seed + 1 + seeds))
    for arm, arm_sets in arms.items():  # validate every arm's whole grid before running anything
        plan_sweep(experiment, sets={**sets, **arm_sets}, grid=grid, seeds=[tune_seed], quick=quick, out=out,
                   name=f"{name}.{arm}.tune")

    tuning_frames, eval_frames, best_points = [], [], {}
    for arm, arm_sets in arms.items():
        df = run_sweep(experiment, sets={**sets, **arm_sets}, grid=grid, seeds=[tune_seed], workers=workers,
                       out=out, name=f"{name}.{arm}.tune", quick=quick, progress=progress)
        df.insert(0, "arm", arm)
        rows = df.to_dict("records")
        best = min(range(len(rows)), key=lambda i: _score(rows[i], goal))
        df["selected"] = [i == best for i in range(len(rows))]
        best_points[arm] = {k: rows[best][k] for k in grid}
        tuning_frames.append(df)
    for arm, arm_sets in arms.items():
        df = run_sweep(experiment, sets={**sets, **arm_sets, **best_points[arm]}, grid=None, seeds=eval_seeds,
                       workers=workers, out=out, name=f"{name}.{arm}.eval", quick=quick, progress=progress)
        df.insert(0, "arm", arm)
        for k, v in best_points[arm].items():
            df[k] = v
        eval_frames.append(df)
    tuning = pd.concat(tuning_frames, ignore_index=True)
    evaluation = pd.concat(eval_frames, ignore_index=True)
    table = summary_table(evaluation, tuning, goal, list(grid), list(arms))

    directory = Path(out) / "compare" / name
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / "table.csv", index=False)
    tuning.to_csv(directory / "tuning.csv", index=False)
    evaluation.to_csv(directory / "evaluation.csv", index=False)
    header = (f"# {name}\n\nexperiment `{experiment}`, metric `{goal.metric}` ({goal.mode}), tuning grid "
              f"{json.dumps(grid, default=str)} on seed {tune_seed}, evaluation seeds {eval_seeds}, shared sets "
              f"{json.dumps(sets, default=str)}, arms {json.dumps(arms, default=str)}\n\n")
    (directory / "table.md").write_text(header + markdown_table(table) + "\n")
    result = Comparison(name, experiment, goal, table, tuning, evaluation, directory, grid_keys=list(grid))
    result.figure = _figure(result, out)
    return result


def _goal(experiment: str, metric: str | None, mode: str | None, tiebreak: str | None) -> Goal:
    base = GOALS.get(experiment)
    if base is None and metric is None:
        raise ConfigError(f"no default metric for {experiment!r}; pass --metric (a result.json key) and --mode")
    if mode is not None and mode not in ("min", "max"):
        raise ConfigError(f"mode must be min or max, got {mode!r}")
    if base is None:
        return Goal(metric, mode or "min", tiebreak)
    return Goal(metric or base.metric, mode or (base.mode if metric is None else "min"),
                tiebreak if tiebreak is not None else (base.tiebreak if metric is None else None),
                base.tiebreak_mode, base.curve)


def _digest(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def summary_table(evaluation, tuning, goal: Goal, grid_keys: list[str], arms: list[str]):
    """One row per arm: chosen setting, tuning value, median/min/max of the metric, reached count."""
    import pandas as pd

    rows = []
    for arm in arms:
        ev = evaluation[evaluation["arm"] == arm].to_dict("records")
        tu = tuning[(tuning["arm"] == arm) & tuning["selected"]].to_dict("records")[0]
        values = [_num(r.get(goal.metric)) if r.get("state") == "done" else None for r in ev]
        med, lo, hi = _median_range(values, goal.mode)
        row = {"arm": arm, **{k: tu[k] for k in grid_keys}, f"tuning {goal.metric}": _num(tu.get(goal.metric)),
               f"median {goal.metric}": med, "min": lo, "max": hi,
               "reached": f"{sum(v is not None for v in values)}/{len(values)}"}
        if goal.tiebreak:
            tbs = [_num(r.get(goal.tiebreak)) for r in ev]
            tbs = [t for t in tbs if t is not None]
            row[f"median {goal.tiebreak}"] = float(pd.Series(tbs).median()) if tbs else None
        row["seeds"] = ",".join(str(r["seed"]) for r in ev)
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df) -> str:
    """A pipe table; inf shows as "not reached", floats with 4 significant digits."""
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return "not reached" if math.isinf(v) else f"{v:.4g}"
        return str(v)

    cols = list(df.columns)
    return tables.markdown_table(cols, ([row[c] for c in cols] for row in df.to_dict("records")), fmt)


def _figure(result: Comparison, out) -> Path | None:
    from lmech.plotting import plt
    from lmech.runs import RunStore

    store = RunStore(Path(out))
    goal = result.goal
    arms = list(result.table["arm"])
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    ax = axes[0]
    if goal.curve:
        for row in result.evaluation.to_dict("records"):
            if row["state"] not in ("done", "diverged"):
                continue
            m = store.metrics(row["run_id"], wide=True)
            if goal.curve in m.columns:
                label = row["arm"] if row["seed"] == result.evaluation[result.evaluation["arm"] == row["arm"]]["seed"].min() else None
                ax.plot(m["step"], m[goal.curve], color=colors[row["arm"]], lw=1, alpha=0.8, label=label)
        ax.set(xlabel="step", ylabel=goal.curve, title=f"{goal.curve}, best setting of each arm, evaluation seeds")
        if goal.curve != "test_acc":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[1]
    finite = [_num(r.get(goal.metric)) for r in result.evaluation.to_dict("records")]
    finite = [v for v in finite if v is not None]
    ceiling = max(finite) * 1.1 if finite else 1.0
    for i, arm in enumerate(arms):
        ev = result.evaluation[result.evaluation["arm"] == arm].to_dict("records")
        missing = 0
        for r in ev:
            v = _num(r.get(goal.metric)) if r["state"] == "done" else None
            missing += v is None
            ax.plot(i, ceiling if v is None else v, "x" if v is None else "o", color=colors[arm], ms=7)
        if missing:
            ax.annotate(f"not reached ({missing}/{len(ev)})", (i, ceiling), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
        med = result.table.loc[result.table["arm"] == arm, f"median {goal.metric}"].iloc[0]
        if math.isfinite(med):
            ax.hlines(med, i - 0.25, i + 0.25, color="black", lw=2)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set(ylabel=goal.metric, title=f"{goal.metric} per seed (bar: median; x: not reached)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result.experiment}: {result.name}")
    fig.tight_layout()
    path = result.directory / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_command(
    experiment: str,
    arm: list[str],
    grid: list[str],
    set_: list[str],
    seeds: int,
    tune_seed: int,
    metric: Optional[str],
    mode: Optional[str],
    tiebreak: Optional[str],
    workers: Optional[int],
    out: Path,
    name: Optional[str],
    quick: bool,
) -> Comparison:
    """What ``lmech compare`` runs (parsing of its repeated options included)."""
    from lmech import experiments

    exp = experiments.get(experiment)
    arms = dict(parse_arm(a) for a in arm)
    if len(arms) != len(arm):
        raise ConfigError("two --arm options have the same name")
    sets = parse_sets(exp, set_)
    return compare(experiment, arms, parse_grid(grid), sets=sets, seeds=seeds, tune_seed=tune_seed, metric=metric,
                   mode=mode, tiebreak=tiebreak, out=out, workers=workers, name=name, quick=quick)


__all__ = ["Comparison", "GOALS", "Goal", "compare", "compare_command", "markdown_table", "parse_arm",
           "summary_table"]
