"""A small real run store shared by the report and lab tests (built once per test session).

It holds one grokking run made by ``run_experiment`` (metrics, checks, a figure) and one sweep
(2 learning rates x 2 seeds) planned, registered and executed by the sweep engine's own functions
(``plan_sweep``, ``write_manifest``, the worker's ``execute``) in this process rather than in a pool
of fresh processes, which would pay torch's start-up four more times. Tests read it and must not
write into it; tests that start runs use their own store.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 60, "eval_every": 10, "width": 16,
        "batch_size": 32}


@dataclass(frozen=True)
class SharedStore:
    root: Path
    run_id: str
    sweep: str
    sweep_runs: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def shared_store() -> SharedStore:
    from lmech.experiments import run_experiment
    from lmech.runs import RunStore
    from lmech.sweeps import plan_sweep, summary, write_manifest
    from lmech.sweeps.worker import execute

    base = Path(tempfile.mkdtemp(prefix="lmech-report-store-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    root = base / "runs"
    run = run_experiment("grokking", TINY, seed=0, out=root)
    plan = plan_sweep("grokking", sets={**TINY, "steps": 40}, grid={"lr": [1e-3, 1e-2]}, seeds=2, out=root)
    write_manifest(RunStore(root), plan, "local")
    outcomes = [execute(spec) for spec in plan.runs]
    assert run["state"] == "done" and all(o["state"] == "done" for o in outcomes), outcomes
    df = summary(plan.name, out=root)
    return SharedStore(root, run["id"], plan.name, tuple(df["run_id"]))
