"""Sweeps: run an experiment over a grid of configs and seeds, locally or on Ray, resumably.

>>> from lmech.sweeps import run_sweep
>>> df = run_sweep("grokking", sets={"model": "mlp", "p": 11, "steps": 40, "width": 16},
...                grid={"lr": [1e-3, 1e-2]}, seeds=2, workers=2, out="runs")   # doctest: +SKIP
>>> df[["run_id", "lr", "seed", "state", "final_test_acc"]]                      # doctest: +SKIP

The same from the shell: ``lmech sweep grokking --set model=mlp --set p=11 --set steps=40
--set width=16 --grid lr=1e-3,1e-2 --seeds 2 --workers 2``; ``lmech runs --sweep NAME`` prints
the table again later, ``lmech.runs.load(sweep=NAME)`` gives every run's metrics in one DataFrame.

Resume rules. Every run has a deterministic id from the hash of (experiment, full config, seed)
(see :mod:`lmech.sweeps.plan`), so running the same sweep again decides per run from what the
store holds under that id:

==============================  ====================================================
store holds                     this invocation
==============================  ====================================================
nothing                         runs it
``done`` or ``diverged``        skips it (a diverged run is a finished result)
``failed``                      skips it; re-runs it with ``retry_failed=True``
``incomplete`` (writer died)    re-runs it
``running`` (writer alive)      leaves it to the process writing it (another driver)
==============================  ====================================================

Before a run is re-run, its old folder is moved aside in one atomic rename to
``ROOT/.attempts/<run_id>/<n>`` (:meth:`lmech.runs.RunStore.retire`): nothing is deleted, the
earlier attempt's error and metrics stay readable, and ``ROOT/<run_id>`` only ever holds the
latest attempt, so no run is duplicated and no half-written run is visible as finished.

Executors: ``"local"`` (:mod:`lmech.sweeps.local`, a process per run, ``workers`` at a time,
default ``os.cpu_count()``) and ``"ray"`` (:mod:`lmech.sweeps.ray_executor`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from numbers import Integral
from pathlib import Path
from typing import Any

from lmech.errors import ConfigError
from lmech.runs.manifests import manifest_path, read_manifest, summary, sweep_frame as _frame
from lmech.runs.store import RunStore, atomic_write_json
from lmech.sweeps.plan import RunSpec, SweepPlan, plan_sweep
from lmech.sweeps.progress import SweepProgress, key_numbers

EXECUTORS = ("local", "ray")


def run_sweep(experiment: str, sets: dict | list[str] | None = None, grid: dict[str, list] | None = None,
              seeds: int | list[int] = 1, random: int | None = None, executor: str = "local",
              workers: int | None = None, address: str | None = None, out: str | Path = "runs",
              name: str | None = None, retry_failed: bool = False, quick: bool = False,
              progress: bool = True, points: list[dict] | None = None, order: str = "points"):
    """Run ``experiment`` for every grid point (or ``random`` of them) and seed; return a DataFrame.

    Arguments: ``sets`` fixes config values (``{"model": "mlp"}`` or ``["model=mlp"]``); ``grid``
    maps keys to lists of values (typed or strings, parsed like ``--set``); ``points`` lists explicit
    configurations (dicts; the sweep runs points x grid); ``order="seeds"`` runs seed 0 of every
    point before seed 1 (see :mod:`lmech.sweeps.plan`); ``seeds`` is a count
    (seeds 0..K-1) or a list; ``random=N`` samples N grid points (see :mod:`lmech.sweeps.plan`);
    ``executor`` is ``"local"`` or ``"ray"`` (``address`` for a running Ray cluster);
    ``workers`` bounds the runs in flight; ``out`` is the run store; ``name`` the sweep's name
    (default derived from experiment, sets and grid, so the same call resumes the same sweep).

    Everything is validated first: a bad experiment, key, value, combination, seed list or
    executor raises :class:`ConfigError` (one line) before anything is written.

    Returns one row per (grid point, seed) of this call, in grid order: ``run_id``, ``seed``, one
    column per grid key, ``state`` (done | diverged | failed | incomplete | running), ``message``,
    ``ran`` (False if it was already finished and skipped), then the run's ``result.json`` numbers
    (``checks`` becomes ``checks_passed``). ``df.attrs["sweep"]`` is the sweep's name.
    """
    plan = plan_sweep(experiment, sets=sets, grid=grid, seeds=seeds, random=random, quick=quick, out=out, name=name,
                      points=points, order=order)
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, Integral) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    workers = None if workers is None else int(workers)
    if executor == "ray":
        from lmech.sweeps.ray_executor import require_ray

        require_ray()
    elif address is not None:
        raise ConfigError("--address is for the ray executor; add --executor ray")

    store = RunStore(plan.out)
    write_manifest(store, plan, executor)
    todo, skipped = _triage(store, plan, retry_failed)
    outcomes: dict[str, dict] = {}
    with SweepProgress(plan.name, total=len(todo), enabled=progress) as bar:
        bar.note(f"sweep {plan.name}: {len(plan.runs)} runs, {len(todo)} to run, {len(skipped)} already "
                 f"finished or running elsewhere; store {plan.out}")

        def on_finish(spec: RunSpec, outcome: dict) -> None:
            outcomes[spec.run_id] = outcome
            bar.finished(spec, outcome)

        if todo and executor == "local":
            from lmech.sweeps.local import run_local

            run_local(todo, workers or os.cpu_count() or 1, bar.started, on_finish)
        elif todo:
            from lmech.sweeps.ray_executor import run_ray

            run_ray(todo, workers, address, bar.started, on_finish)
    entries = [{"run_id": s.run_id, "seed": s.seed, "params": s.params} for s in plan.runs]
    df = _frame(store, entries, outcomes)
    df.insert(df.columns.get_loc("message") + 1, "ran", [s.run_id in outcomes for s in plan.runs])
    df.attrs["sweep"] = plan.name
    return df


def _triage(store: RunStore, plan: SweepPlan, retry_failed: bool) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split the plan into runs to execute now and runs to leave alone (see the module's table)."""
    todo, skipped = [], []
    for spec in plan.runs:  # run ids are distinct: grid values are distinct after typing, seeds too
        folder = store.root / spec.run_id
        if not folder.exists():
            todo.append(spec)
            continue
        state = store.status(spec.run_id)["state"] if (folder / "config.json").exists() else "incomplete"
        if state in ("done", "diverged", "running") or (state == "failed" and not retry_failed):
            skipped.append(spec)
        else:  # incomplete, or failed with retry_failed: move the old attempt aside, run again
            store.retire(spec.run_id)
            todo.append(spec)
    return todo, skipped


# -- manifest -----------------------------------------------------------------------------------
def write_manifest(store: RunStore, plan: SweepPlan, executor: str) -> Path:
    """Add this invocation's runs to ``ROOT/sweeps/<name>.json`` (union over invocations).

    Written before any run starts, so a killed sweep is still listed by ``lmech runs --sweep``.
    An exclusive lock (where ``fcntl`` exists) keeps two drivers from losing each other's entries.
    """
    path = manifest_path(store, plan.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        manifest = read_manifest(store, plan.name) or {"name": plan.name, "experiment": plan.experiment,
                                                       "runs": [], "invocations": []}
        if manifest["experiment"] != plan.experiment:
            raise ConfigError(f"sweep {plan.name!r} in {store.root} belongs to experiment "
                              f"{manifest['experiment']!r}; pick another --name")
        known = {entry["run_id"] for entry in manifest["runs"]}
        manifest["runs"] += [{"run_id": s.run_id, "seed": s.seed, "params": s.params}
                             for s in plan.runs if s.run_id not in known]
        manifest["grid_keys"] = list(dict.fromkeys([*manifest.get("grid_keys", []), *plan.grid_keys]))
        manifest["invocations"].append({
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "executor": executor,
            "sets": plan.sets, "grid": plan.grid, "points": plan.points, "seeds": plan.seeds, "random": plan.random,
            "quick": plan.quick, "order": plan.order})
        atomic_write_json(path, manifest)
    return path


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no lock (one driver per sweep at a time)
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sweep_table(df, title: str | None = None):
    """A sweep frame for the terminal: a table (run id, grid values, seed, state, key results) and,
    below it, the message of every run that did not finish ``done``.

    Result columns shown: numeric fields of ``result.json`` that differ between runs (constant
    ones, like the training-set size, say nothing about the sweep), at most five, plus wall time.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from lmech.sweeps.progress import COLORS

    fixed = {"run_id", "seed", "state", "message", "ran"}
    params = [c for c in df.columns if c not in fixed and c in _param_columns(df)]
    numeric = [c for c in df.columns if c not in fixed and c not in params and c != "wall_time_s"
               and c in key_numbers({c: 0.0}, limit=10**6) and _is_numeric(df[c])]
    shown = [c for c in numeric if df[c].nunique(dropna=False) > 1 or len(df) == 1][:5]
    if "wall_time_s" in df.columns:
        shown.append("wall_time_s")
    records = df.to_dict("records")
    columns = ["run_id", *params, "seed", "state", *shown]
    table = Table(title=title)
    for column in columns:
        table.add_column("run id" if column == "run_id" else column, no_wrap=column in ("run_id", "state"))
    notes = []
    for row in records:
        color = COLORS.get(row["state"], "white")
        table.add_row(*(f"[{color}]{row['state']}[/]" if c == "state" else _fmt(row.get(c)) for c in columns))
        if row["state"] != "done" and row.get("message"):
            notes.append(Text(f"{row['run_id']} ({row['state']}): {row['message']}", style=color))
    return Group(table, *notes)


def _param_columns(df) -> list[str]:
    cols = list(df.columns)
    return cols[cols.index("seed") + 1:cols.index("state")]


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _fmt(value: Any) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["EXECUTORS", "RunSpec", "SweepPlan", "plan_sweep", "read_manifest", "run_sweep", "summary",
           "sweep_table", "write_manifest"]
