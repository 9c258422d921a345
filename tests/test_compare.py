"""lmech.compare: arm parsing, ranking, the median/range table, and a tiny real comparison (CLI too)."""

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from lmech.cli import app
from lmech.compare import GOALS, Goal, _score, compare, markdown_table, parse_arm, summary_table
from lmech.errors import ConfigError

TINY_INR = {"resolution": 16, "steps": 12, "width": 8, "depth": 1, "n_features": 4, "eval_every": 4,
            "batch_size": 4}


def test_parse_arm():
    assert parse_arm("poprisk:optimizer=poprisk,gate=soft") == ("poprisk", {"optimizer": "poprisk", "gate": "soft"})
    assert parse_arm("adamw:") == ("adamw", {})
    for bad in ("noname", "bad name:optimizer=adamw", "a:optimizer"):
        with pytest.raises(ConfigError):
            parse_arm(bad)


def test_ranking_prefers_reached_then_tiebreak_then_failed():
    goal = GOALS["grokking"]  # step_to_95 (min), tiebreak final_test_acc (max)
    rows = [
        {"state": "done", "step_to_95": None, "final_test_acc": 0.5},
        {"state": "done", "step_to_95": 900, "final_test_acc": 0.99},
        {"state": "failed"},
        {"state": "done", "step_to_95": None, "final_test_acc": 0.7},
        {"state": "done", "step_to_95": 400, "final_test_acc": 0.96},
    ]
    order = sorted(range(len(rows)), key=lambda i: _score(rows[i], goal))
    assert order == [4, 1, 3, 0, 2]
    assert _score({"state": "done", "x": 2.0}, Goal("x", "max")) < _score({"state": "done", "x": 1.0}, Goal("x", "max"))


def test_summary_table_counts_missing_as_not_reached():
    goal = Goal("step", "min", "acc", "max")
    tuning = pd.DataFrame([{"arm": "a", "lr": 0.1, "selected": True, "step": 10},
                           {"arm": "b", "lr": 0.2, "selected": True, "step": None}])
    evaluation = pd.DataFrame([
        {"arm": "a", "seed": 1, "state": "done", "step": 10, "acc": 0.9},
        {"arm": "a", "seed": 2, "state": "done", "step": 30, "acc": 0.9},
        {"arm": "a", "seed": 3, "state": "done", "step": None, "acc": 0.5},
        {"arm": "b", "seed": 1, "state": "done", "step": 50, "acc": 0.9},
        {"arm": "b", "seed": 2, "state": "failed", "step": None, "acc": None},
        {"arm": "b", "seed": 3, "state": "done", "step": None, "acc": 0.4},
    ])
    table = summary_table(evaluation, tuning, goal, ["lr"], ["a", "b"])
    a, b = table.to_dict("records")
    assert (a["median step"], a["min"], a["reached"]) == (30.0, 10.0, "2/3") and math.isinf(a["max"])
    assert math.isinf(b["median step"]) and b["min"] == 50.0 and b["reached"] == "1/3"
    assert a["median acc"] == 0.9 and b["lr"] == 0.2
    assert "not reached" in markdown_table(table)


def test_compare_tiny_inr(tmp_path):
    arms = {"adamw": {"optimizer": "adamw"}, "poprisk": {"optimizer": "poprisk", "gate": "snr"}}
    grid = {"lr": [1e-3, 1e-2]}
    result = compare("inr-noise", arms, grid, sets=TINY_INR, seeds=2, out=tmp_path, workers=2, progress=False)
    tuning, evaluation, table = result.tuning, result.evaluation, result.table
    assert len(tuning) == 4 and set(tuning["seed"]) == {0}
    assert len(evaluation) == 4 and set(evaluation["seed"]) == {1, 2}     # the tuning seed is not reused
    assert (evaluation["state"] == "done").all()
    for arm in arms:                                                        # the best tuning point was evaluated
        tu = tuning[tuning["arm"] == arm]
        best_lr = tu.loc[tu["final_clean_mse"].idxmin(), "lr"]
        assert tu.loc[tu["selected"], "lr"].item() == best_lr
        row = table[table["arm"] == arm].iloc[0]
        assert row["lr"] == best_lr
        ev = evaluation[evaluation["arm"] == arm]["final_clean_mse"]
        assert row["median final_clean_mse"] == pytest.approx(ev.median())
        assert (row["min"], row["max"]) == (pytest.approx(ev.min()), pytest.approx(ev.max()))
    for f in ("table.md", "table.csv", "tuning.csv", "evaluation.csv", "comparison.png"):
        assert (result.directory / f).exists()
    again = compare("inr-noise", arms, grid, sets=TINY_INR, seeds=2, out=tmp_path, workers=2, progress=False)
    assert not again.tuning["ran"].any() and not again.evaluation["ran"].any()  # resumed: nothing re-run
    pd.testing.assert_frame_equal(again.table, table)


def test_compare_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="an arm fixes a key or the grid tunes it"):
        compare("inr-noise", {"a": {"lr": "0.1"}}, {"lr": [0.1, 0.2]}, out=tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        compare("inr-noise", {"a": {"bogus": "1"}}, {"lr": [0.1]}, out=tmp_path)
    with pytest.raises(ConfigError, match="give a tuning grid"):
        compare("inr-noise", {"a": {}}, {}, out=tmp_path)
    assert not (tmp_path / "compare").exists()


def test_cli_compare_bad_input_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["compare", "inr-noise", "--arm", "adamw", "--grid", "lr=1e-3",
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "is not NAME:key=value" in " ".join(result.output.split())
    assert not (tmp_path / "s").exists()
