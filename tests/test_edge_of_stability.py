"""edge-of-stability: tiny runs log and check, the quick config reaches every threshold, validation."""

import pytest

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.edge_of_stability import (
    EdgeOfStabilityConfig,
    arms,
    check,
    parse_lrs,
)
from lmech.runs import load

TINY = {"n_train": 60, "width": 16, "steps": 40, "eval_every": 10, "gd_lrs": "0.1,0.2", "momentum_lr": 0.05,
        "adam_lr": 0.001}


def test_arms_carry_the_theory_thresholds():
    cfg = EdgeOfStabilityConfig(gd_lrs="0.1", momentum=0.5, momentum_lr=0.15, adam_lr=0.002, beta1=0.9)
    got = {a.name: (a.method, a.threshold, a.tolerance) for a in arms(cfg)}
    assert got["gd_0.1"] == ("gd", pytest.approx(20.0), 0.10)
    assert got["heavy_ball_0.15"] == ("heavy_ball", pytest.approx(3.0 / 0.15), 0.10)
    assert got["adam_0.002"] == ("adam", pytest.approx(38.0 / 0.002), 0.15)
    assert [a.name for a in arms(EdgeOfStabilityConfig(gd_lrs="", momentum_lr=0.0))] == ["adam_0.002"]
    assert parse_lrs(" 0.06, 0.12 ") == [0.06, 0.12]


def test_tiny_run_logs_every_arm_and_checks_each(tmp_path):
    summary = run_experiment("edge-of-stability", TINY, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    df = load(summary["id"], root=tmp_path, wide=True)
    for arm in ("gd_0.1", "gd_0.2", "heavy_ball_0.05", "adam_0.001"):
        assert df[f"{arm}/loss"].notna().sum() == 41                     # every step
        measured = df.dropna(subset=[f"{arm}/sharpness"])["step"].tolist()
        assert measured == ([10, 20, 30, 40] if arm.startswith("adam") else [0, 10, 20, 30, 40])
    r = summary["result"]
    assert r["gd_0.1.threshold"] == pytest.approx(20.0)
    assert len(summary["checks"]) == 8 and all(isinstance(c.passed, bool) for c in summary["checks"])
    assert (tmp_path / summary["id"] / "figures" / "edge-of-stability.png").exists()


def test_check_uses_the_last_half_and_fails_a_diverged_arm():
    result = {"arms": ["gd_0.1"], "last_fraction": 0.5, "gd_0.1.threshold": 20.0, "gd_0.1.edge_ratio": 1.05,
              "gd_0.1.low_ratio": 0.6, "gd_0.1.tolerance": 0.1, "gd_0.1.formula": "2/eta", "gd_0.1.diverged_at": None}
    rows = check(result)
    assert rows[0].passed and rows[0].measured == pytest.approx(21.0) and rows[1].passed
    assert not check({**result, "gd_0.1.edge_ratio": 1.2})[0].passed
    assert not check({**result, "gd_0.1.diverged_at": 17})[0].passed
    assert not check({**result, "gd_0.1.low_ratio": 0.95})[1].passed


def test_quick_config_reaches_every_threshold(tmp_path):
    """The quick config (GD 2/eta, heavy ball (2+2b)/eta, Adam 38/eta): every check passes."""
    summary = run_experiment("edge-of-stability", {}, seed=0, out=tmp_path, quick=True)
    assert summary["state"] == "done", summary["message"]
    failed = [c for c in summary["checks"] if not c.passed]
    assert not failed, failed


@pytest.mark.parametrize("sets, message", [
    ({"gd_lrs": "0.1,abc"}, "comma-separated"),
    ({"gd_lrs": "-0.1"}, "positive"),
    ({"steps": 10, "eval_every": 5}, "at least 4"),
    ({"momentum": 1.0}, "momentum"),
    ({"task": "digits", "n_train": 2000}, "digits has"),
    ({"gd_lrs": "", "momentum_lr": 0, "adam_lr": 0}, "no arm"),
])
def test_bad_config_is_refused(sets, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        get("edge-of-stability").make_config(sets)


def test_probes_economy_adds_monitor_columns_per_arm_and_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {**TINY, "gd_lrs": "0.1", "adam_lr": 0.0}
    _, probed = assert_probes_leave_training_unchanged("edge-of-stability", tiny, tmp_path, "sharpness/lambda_1")
    assert {"gd_0.1/probe/loss", "heavy_ball_0.05/probe/loss"} <= set(probed.columns)


def test_a_diverged_arm_is_recorded_and_the_others_still_run(tmp_path):
    summary = run_experiment("edge-of-stability", {**TINY, "gd_lrs": "1e6", "adam_lr": 0.0}, seed=0, out=tmp_path)
    assert summary["state"] == "done"
    result = summary["result"]
    assert result["gd_1e+06.diverged_at"] is not None and result["heavy_ball_0.05.diverged_at"] is None
    df = load(summary["id"], root=tmp_path, wide=True)
    assert df["gd_1e+06/loss"].notna().sum() == result["gd_1e+06.diverged_at"]   # steps 0 .. diverged_at - 1
