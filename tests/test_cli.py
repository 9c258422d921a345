import json

import pytest
from typer.testing import CliRunner

from lmech.cli import app

runner = CliRunner()

TINY = ["--set", "model=mlp", "--set", "p=11", "--set", "op=+", "--set", "train_fraction=0.5",
        "--set", "steps=30", "--set", "eval_every=10", "--set", "width=16", "--set", "batch_size=32"]


def test_list_shows_grokking():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "grokking" in result.output


@pytest.mark.parametrize("args, message", [
    (["run", "nosuch"], "unknown experiment 'nosuch'"),
    (["run", "grokking", "--set", "bogus=1"], "unknown key 'bogus'"),
    (["run", "grokking", "--set", "lr=fast"], "bad value for lr: 'fast' is not a number"),
    (["run", "grokking", "--set", "steps=1.5"], "bad value for steps"),
    (["run", "grokking", "--set", "model=cnn"], "is not one of transformer, mlp"),
    (["run", "grokking", "--set", "lr=-1"], "lr must be positive"),
    (["run", "grokking", "--set", "p=96"], "p must be prime"),
    (["run", "grokking", "--set", "lr"], "is not key=value"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "store"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_run_writes_config_metrics_status_figure(tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(app, ["run", "grokking", *TINY, "--seed", "1", "--out", str(out)])
    # a 30-step run does not grok: the run is 'done', its check fails, and the exit code says so
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert json.loads((folder / "status.json").read_text())["state"] == "done"
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["model"] == "mlp" and config["seed"] == 1
    assert (folder / "metrics.parquet").exists()
    assert (folder / "figures" / "grokking.png").stat().st_size > 10_000
    listing = runner.invoke(app, ["runs", "--out", str(out)])
    assert listing.exit_code == 0 and "done" in listing.output
