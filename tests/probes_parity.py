"""The check every catalog entry on the training loop shares: ``probes="economy"`` adds the
Monitor's columns to a run and changes none of its training metrics (nor its result)."""

from __future__ import annotations

import numpy as np

from lmech.experiments import run_experiment
from lmech.runs import load


def assert_probes_leave_training_unchanged(name: str, tiny: dict, root, probe_column: str = "probe/loss",
                                           quick: bool = False):
    """Run ``name`` at ``tiny`` with probes none and economy; ``probe_column`` (a column name, or
    a suffix of one for prefixed loops) appears only in the second, every other column and the
    result are identical bit for bit (``quick``: on top of the entry's quick configuration).
    Returns the two wide metric tables (all steps of each)."""
    plain = run_experiment(name, {**tiny, "probes": "none"}, seed=0, out=root, quick=quick)
    probed = run_experiment(name, {**tiny, "probes": "economy"}, seed=0, out=root, quick=quick)
    assert plain["state"] == probed["state"] == "done", (plain["message"], probed["message"])
    a, b = (load(s["id"], root=root, wide=True) for s in (plain, probed))
    assert not any(c.endswith(probe_column) for c in a.columns)
    assert any(c.endswith(probe_column) for c in b.columns), sorted(b.columns)
    assert set(a.columns) < set(b.columns)
    same_steps = b.set_index("step").loc[a["step"]].reset_index()   # the steps the plain run logged
    for column in a.columns:
        assert np.array_equal(a[column].to_numpy(), same_steps[column].to_numpy(), equal_nan=True), column
    ra, rb = ({k: v for k, v in s["result"].items() if k != "wall_time_s"} for s in (plain, probed))
    assert repr(ra) == repr(rb)                                   # nan-safe
    return a, b
