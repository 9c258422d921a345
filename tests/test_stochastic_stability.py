"""stochastic-stability: a tiny run logs both sharpnesses per arm; the check rows; bad configs."""

import pytest

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.stochastic_stability import check
from lmech.runs import load

TINY = {"n_train": 64, "width": 8, "lrs": "0.2", "batch_sizes": "8,32", "steps": 40, "eval_every": 10,
        "num_batches": 4}


def test_tiny_run_logs_every_arm(tmp_path):
    summary = run_experiment("stochastic-stability", TINY, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    df = load(summary["id"], root=tmp_path, wide=True)
    for arm in ("lr0.2_b8", "lr0.2_b32"):
        assert df.dropna(subset=[f"{arm}/batch_sharpness"])["step"].tolist() == [0, 10, 20, 30, 40]
        assert (df[f"{arm}/threshold"].dropna() == 10.0).all()
    assert len(summary["checks"]) == 5
    assert (tmp_path / summary["id"] / "figures" / "stochastic-stability.png").exists()


def test_check_rows():
    result = {"arms": ["lr0.2_b8", "lr0.2_b32"], "lrs": [0.2], "batch_sizes": [8, 32], "last_fraction": 0.5,
              "lr0.2_b8.threshold": 10.0, "lr0.2_b8.batch_sharpness": 9.0, "lr0.2_b8.sharpness": 7.0,
              "lr0.2_b8.diverged_at": None,
              "lr0.2_b32.threshold": 10.0, "lr0.2_b32.batch_sharpness": 12.0, "lr0.2_b32.sharpness": 11.5,
              "lr0.2_b32.diverged_at": None}
    assert [r.passed for r in check(result)] == [True, True, False, False, True]
    assert not check({**result, "lr0.2_b32.sharpness": 6.0})[-1].passed        # ordering broken
    assert not check({**result, "lr0.2_b8.diverged_at": 20})[0].passed


@pytest.mark.parametrize("sets, message", [({"lrs": "0.1,x"}, "comma-separated"), ({"batch_sizes": "1000"}, "n_train"),
                                           ({"steps": 10, "eval_every": 5}, "at least 4")])
def test_bad_config(sets, message):
    with pytest.raises(ConfigError, match=message):
        get("stochastic-stability").make_config(sets)


def test_probes_economy_per_arm_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    _, probed = assert_probes_leave_training_unchanged("stochastic-stability", TINY, tmp_path, "probe/loss")
    assert {"lr0.2_b8/probe/loss", "lr0.2_b32/probe/loss"} <= set(probed.columns)


def test_a_diverged_arm_is_recorded(tmp_path):
    summary = run_experiment("stochastic-stability", {**TINY, "lrs": "1e6", "batch_sizes": "8"}, seed=0, out=tmp_path)
    assert summary["state"] == "done"
    assert summary["result"]["lr1e+06_b8.diverged_at"] is not None
