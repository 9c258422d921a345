"""Reading sweeps beside the run store: manifests and the per-run table of a sweep.

A sweep executor (:mod:`lmech.sweeps`) writes ``ROOT/sweeps/<name>.json``, the union of its runs
over every invocation under that name (``runs``: ``run_id``, ``seed``, ``params``; ``grid_keys``;
``invocations``). Readers (the report, the lab, ``lmech runs --sweep``) need only this module and
the store, never the executors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmech.errors import ConfigError
from lmech.runs.store import RunStore


def manifest_path(store: RunStore, sweep: str) -> Path:
    """``ROOT/sweeps/<sweep>.json``."""
    return store.root / "sweeps" / f"{sweep}.json"


def read_manifest(store: RunStore, sweep: str) -> dict | None:
    """The manifest of ``sweep`` (its runs and invocations), or ``None`` if there is none."""
    path = manifest_path(store, sweep)
    return json.loads(path.read_text()) if path.exists() else None


def summary(sweep: str, out: str | Path = "runs"):
    """Every run of a sweep so far (all invocations under its name), like :func:`lmech.sweeps.run_sweep`'s frame."""
    store = RunStore(Path(out))
    manifest = read_manifest(store, sweep)
    if manifest is None:
        known = sorted(p.stem for p in (store.root / "sweeps").glob("*.json"))
        hint = f"; sweeps in {store.root}: {', '.join(known)}" if known else ""
        raise ConfigError(f"no sweep {sweep!r} in {store.root}{hint}")
    df = sweep_frame(store, manifest["runs"])
    df.attrs["sweep"] = sweep
    return df


def sweep_frame(store: RunStore, entries: list[dict], outcomes: dict[str, dict] | None = None):
    """One row per manifest entry (``run_id``, ``seed``, its grid values): the run's state, message
    and result fields, read from its folder (or from ``outcomes``, for a run that failed before its
    folder was made; ``state="missing"`` for one not run yet)."""
    outcomes = outcomes or {}
    import pandas as pd

    rows = []
    for entry in entries:
        run_id = entry["run_id"]
        row: dict[str, Any] = {"run_id": run_id, "seed": entry["seed"], **entry.get("params", {})}
        if (store.root / run_id / "config.json").exists():
            status, result = store.status(run_id), store.result(run_id)
        elif run_id in outcomes:  # failed before its folder was made
            status, result = outcomes[run_id], outcomes[run_id].get("result", {})
        else:
            status, result = {"state": "missing", "message": "no run folder (not run yet)"}, {}
        row["state"], row["message"] = status["state"], status.get("message", "")
        for key, value in result.items():
            if key == "checks":
                key, value = "checks_passed", all(c.get("passed") for c in value)
            row[key if key not in row else f"result_{key}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["manifest_path", "read_manifest", "summary", "sweep_frame"]
