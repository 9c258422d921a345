"""The no-validation benchmark: the study script's quick configuration and the catalog entry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lmech.experiments._no_validation import make_task, score_stopping

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("no_validation_study", ROOT / "scripts" / "no_validation_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_study_writes_tables_summary_and_figure(tmp_path):
    _study().main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "tables.md").read_text()
    assert "relative to the oracle" in text and "AUROC" in text and "retraining" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["rules"]) == {"path-loo", "path-gcv", "gate-fraction", "channel-noise", "evidence", "train-loss"}
    for r in summary["rules"].values():
        assert all(m >= 1.0 - 1e-12 for m in r["median_ratios"])     # nothing beats the oracle on its own loss
    assert (tmp_path / "figure.png").stat().st_size > 0
    # resumable: a second call reads the cached runs
    mtime = (tmp_path / "raw").stat().st_mtime
    _study().main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "raw").stat().st_mtime == mtime


@pytest.mark.parametrize("name", ["digits", "teacher", "inr"])   # mnist1d: its generator takes a minute
def test_tasks_have_the_requested_corrupted_fraction(name):
    t = make_task(name, 0.25, seed=1, n_train=64)
    assert int(t.corrupted.sum()) == 16 and t.y.shape == (64, 1) and t.x_test.shape[0] > 64


def test_score_stopping_ratios_are_relative_to_the_oracle():
    rows = [{"step": s, "loss": 1.0 / s, "poprisk_loo": (s - 30) ** 2, "poprisk_gcv": 1.0, "gate_fraction": 0.9,
             "channel_noise_risk": 1.0 / s, "eb": -1.0, "test_loss": 1 + (s - 50) ** 2 / 100, "test_error": 0.1}
            for s in range(10, 110, 10)]
    out = score_stopping(rows, n=100, patience=2)
    assert out["oracle"]["selected"] == 50
    assert out["path-loo"]["selected"] == 30 and out["path-loo"]["stop"] == 50
    assert out["path-loo"]["ratio"] == pytest.approx((1 + 4) / 1) and out["path-loo"]["saved"] == 50
    assert not out["evidence"]["fired"] and out["evidence"]["saved"] == 0
    assert np.isfinite(out["channel-noise"]["ratio"])


def test_catalog_entry_quick_checks_pass(tmp_path):
    from lmech.experiments import run_experiment

    r = run_experiment("no-validation", quick=True, out=tmp_path)
    assert r["state"] == "done"
    assert all(c.passed for c in r["checks"]), [c.as_dict() for c in r["checks"]]
