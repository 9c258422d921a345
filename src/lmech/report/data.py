"""What a report or the lab shows about one run, read through :class:`lmech.runs.RunStore`.

:func:`run_view` gathers a run's config, provenance, status, result numbers, check rows and figure
files; :func:`read_metrics` reads its scalar metrics (wide: one row per step) while the run may
still be writing them. Nothing here opens the run's Parquet files itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from lmech.runs import RunStore

FIGURE_SUFFIXES = (".png", ".svg")


@dataclass
class RunView:
    """One run as stored: ``config`` is the experiment config; ``provenance`` the rest of
    ``config.json`` (created, versions, git commit, platform, config hash); ``checks`` the rows of
    the experiment's ``check()`` as dicts; ``figures`` the figure files of the run folder."""

    id: str
    experiment: str
    sweep: str | None
    seed: int
    config: dict
    provenance: dict
    status: dict
    result: dict
    checks: list[dict]
    figures: list[Path] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.status.get("state", "incomplete")


def run_view(store: RunStore, run: str | Path) -> RunView:
    """Read one run (an id, an id prefix or a folder, as :meth:`RunStore.resolve` takes)."""
    folder = store.resolve(run)
    meta = store.config(folder)
    result = dict(store.result(folder))
    checks = result.pop("checks", None) or []
    figures = sorted(p for p in (folder / "figures").glob("*") if p.suffix in FIGURE_SUFFIXES
                     and not p.name.startswith("."))
    provenance = {k: v for k, v in meta.items() if k not in ("id", "experiment", "sweep", "seed", "config")}
    return RunView(id=meta["id"], experiment=meta["experiment"], sweep=meta.get("sweep"), seed=int(meta["seed"]),
                   config=meta["config"], provenance=provenance, status=store.status(folder), result=result,
                   checks=checks, figures=figures)


def read_metrics(store: RunStore, run: str | Path, wide: bool = True, attempts: int = 3) -> pd.DataFrame:
    """A run's scalar metrics via :meth:`RunStore.metrics` (wide: one row per step, sorted).

    A running writer compacts its Parquet parts into ``metrics.parquet`` when it ends and then
    deletes the parts; a read that listed the parts just before can miss one. Such a read is
    retried (``attempts`` times), after which the error propagates.
    """
    for attempt in range(attempts):
        try:
            df = store.metrics(run, wide=wide)
            break
        except (FileNotFoundError, pa.ArrowException, OSError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    if wide and not df.empty:
        df = df.sort_values("step").reset_index(drop=True)
    return df


__all__ = ["RunView", "read_metrics", "run_view"]
