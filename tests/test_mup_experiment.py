"""The mup catalog entry: optimum estimators, a tiny run, the quick config, validation."""

import math

import pytest

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.mup import grid_optimum, vertex_optimum
from lmech.runs import load

TINY = {"coord_widths": "16,32", "coord_seeds": 1, "coord_steps": 2, "coord_transformer": True,
        "transfer_widths": "16,32", "transfer_steps": 5, "lr_min_log2": -8, "lr_max_log2": -6, "n_train": 200}


def test_optimum_estimators():
    grid = [-3, -2, -1, 0]
    losses = [3.0, 1.0, 1.0, 3.0]                       # symmetric around -1.5
    assert vertex_optimum(grid, losses) == pytest.approx(-1.5)
    assert grid_optimum(grid, losses) == -2
    assert vertex_optimum(grid, [0.5, 1.0, 2.0, 3.0]) == -3   # edge of the grid
    assert grid_optimum(grid, [2.0, 1.0, float("nan"), 3.0]) == -2  # a diverged run is the worst


def test_tiny_run_logs_and_checks(tmp_path):
    summary = run_experiment("mup", TINY, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    r = summary["result"]
    assert set(r["transfer.mup.optimal_log2_lr"]) == {"16", "32"}
    assert math.isfinite(r["coord.transformer.mup.max_abs_slope"])
    assert len(summary["checks"]) == 7  # MLP and transformer coordinate checks, transfer, wider-is-better
    df = load(summary["id"], root=tmp_path, wide=True)
    assert {"transfer/sp/optimal_log2_lr", "transfer/mup/best_loss"} <= set(df.columns)
    assert (tmp_path / summary["id"] / "figures" / "mup.png").exists()


def test_quick_config_passes(tmp_path):
    """Quick config: coordinate check flat under muP and growing under SP; the optimal learning
    rate moves at most one grid step under muP and at least two under SP (widths 64-1024)."""
    summary = run_experiment("mup", {}, seed=0, out=tmp_path, quick=True)
    assert summary["state"] == "done", summary["message"]
    failed = [c for c in summary["checks"] if not c.passed]
    assert not failed, failed


@pytest.mark.parametrize("sets, message", [
    ({"coord_widths": "64"}, "at least two widths"),
    ({"lr_min_log2": -4, "lr_max_log2": -3}, "at least 3 points"),
    ({"transfer_widths": "64,abc"}, "comma-separated"),
    ({"coord_lr": 0}, "coord_lr"),
])
def test_bad_config_is_refused(sets, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        get("mup").make_config(sets)


def test_probes_economy_on_the_transfer_runs_changes_no_measurement(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {**TINY, "coord_transformer": False}
    _, probed = assert_probes_leave_training_unchanged("mup", tiny, tmp_path, "probe/loss")
    assert any(c.startswith("transfer/mup/w") and c.endswith("/probe/loss") for c in probed.columns)
