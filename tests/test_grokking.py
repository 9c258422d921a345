"""The grokking experiment: the README's main job groks, and runs are reproducible."""

import pytest

from lmech.experiments import run_experiment
from lmech.runs import load

TINY = {"model": "mlp", "p": 11, "op": "*", "train_fraction": 0.5, "steps": 40, "eval_every": 10,
        "width": 16, "batch_size": 16}


def test_same_config_and_seed_gives_identical_metrics(tmp_path):
    a = run_experiment("grokking", TINY, seed=5, out=tmp_path / "a")
    b = run_experiment("grokking", TINY, seed=5, out=tmp_path / "b")
    c = run_experiment("grokking", TINY, seed=6, out=tmp_path / "c")
    ma, mb, mc = (load(r["id"], root=tmp_path / d) for r, d in ((a, "a"), (b, "b"), (c, "c")))
    assert ma.equals(mb)
    assert not ma["value"].equals(mc["value"])


def test_transformer_variant_runs(tmp_path):
    cfg = {**TINY, "model": "transformer", "width": 16, "heads": 2, "depth": 1}
    summary = run_experiment("grokking", cfg, seed=0, out=tmp_path)
    assert summary["state"] == "done"
    df = load(summary["id"], root=tmp_path, wide=True)
    assert {"train_loss", "test_acc", "weight_norm"} <= set(df.columns)
    assert df["step"].tolist() == [0, 10, 20, 30, 40]


def test_readme_main_job_groks(tmp_path):
    """`lmech run grokking --set model=mlp --set op=+ --set train_fraction=0.4` (about 40 s on 2 cores)."""
    summary = run_experiment("grokking", {"model": "mlp", "op": "+", "train_fraction": 0.4}, seed=0, out=tmp_path)
    assert summary["state"] == "done"
    assert summary["result"]["step_to_95"] is not None
    assert summary["result"]["final_test_acc"] >= 0.95
    assert all(row.passed for row in summary["checks"])


@pytest.mark.slow
def test_paper_setting_transformer_division_groks(tmp_path):
    """The default config: a/b mod 97, 25% train, 2-layer transformer (tens of minutes on CPU)."""
    summary = run_experiment("grokking", {}, seed=0, out=tmp_path)
    assert summary["result"]["final_test_acc"] >= 0.95
