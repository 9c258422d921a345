"""Bad input through the real command (a subprocess): exit code 2, one line on stderr, nothing
written; user text printed as it is; exit codes of a finished run; what a stopped loop keeps."""

import os
from pathlib import Path
import subprocess
import sys
import textwrap
import time

import pytest

from lmech.runs import RunStore

TINY = ["--set", "model=mlp", "--set", "p=11", "--set", "op=+", "--set", "train_fraction=0.5",
        "--set", "steps=30", "--set", "eval_every=10", "--set", "width=16", "--set", "batch_size=32"]


def lmech(*args, cwd=None, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmech.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def assert_bad_input(result, message, written):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not written.exists() or not any(written.iterdir()), list(written.iterdir())


@pytest.mark.parametrize("args, message", [
    (["run", "grokking", "--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["run", "grokking", "--seed", "99999999999999999999"], "seed must be an integer from 0 to 2**63 - 1"),
    (["run", "grokking", "--threads", "0"], "--threads must be a positive integer (at most 4096), got 0"),
    (["run", "grokking", "--threads", "-3"], "--threads must be a positive integer (at most 4096), got -3"),
    (["verify", "deep-linear", "--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1"),
    (["verify", "deep-linear", "--threads", "0"], "--threads must be a positive integer"),
    (["sweep", "grokking", "--seeds", "0"], "seeds must be at least 1"),
    (["run", "grokking", "--set", "model=[mlp]"], "'[mlp]' is not one of transformer, mlp"),
    (["run", "grokking", "--set", "model=[/x]"], "'[/x]' is not one of transformer, mlp"),
    (["run", "grokking", "--set", "lr=[bold]x"], "'[bold]x' is not a number"),
    (["run", "grokking", "--set", "model=mlp", "--set", "width=1000000"], "needs about 2.25e+04 GiB"),
    (["run", "grokking", "--max-memory", "100M"], "needs about 0.484 GiB"),
    (["run", "grokking", "--max-memory", "lots"], "--max-memory 'lots' is not a size"),
    (["run", "grokking", "--seed", "true"], "Invalid value for '--seed'"),
    (["run", "grokking", "--bogus"], "No such option: --bogus"),
    (["run", "inr-noise", "--set", "stopping=oracle"], "bad value for stopping: 'oracle' is not one of none, path_loo"),
    (["run", "inr-noise", "--set", "stopping=gate", "--set", "stop_patience=0"], "patience must be a positive integer"),
    (["run", "inr-noise", "--set", "stop_patience=3"], "stop_patience has no effect with stopping=none"),
    (["run", "pinn-advection", "--set", "stopping=path_loo"], "stopping=path_loo is not available here"),
    (["sweep", "quanta", "--grid", "stopping=gate,channel_noise"], "stopping=channel_noise is not available here"),
])
def test_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "store"
    assert_bad_input(lmech(*args, "--out", str(out)), message, out)


@pytest.mark.parametrize("command", [["run", "grokking", *TINY], ["sweep", "grokking", *TINY],
                                     ["verify", "deep-linear", "--quick"]])
def test_out_at_a_file_exits_2_and_leaves_the_file_alone(tmp_path, command):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    result = lmech(*command, "--out", str(target))
    assert_bad_input(result, f"--out {target} is a file; give a folder", tmp_path / "nothing")
    assert target.read_text() == "keep me"
    inside = lmech(*command, "--out", str(target / "sub"))
    assert_bad_input(inside, "is inside the file", tmp_path / "nothing")


def test_report_out_at_a_file_exits_2(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert_bad_input(lmech("report", "some-run", "--out", str(target)), "is a file; give a folder", tmp_path / "x")


def test_a_finished_run_whose_check_fails_exits_1(tmp_path):
    result = lmech("run", "grokking", *TINY, "--out", str(tmp_path / "store"))
    assert result.returncode == 1, result.stderr
    assert "FAIL" in result.stdout and RunStore(tmp_path / "store").runs()["state"].tolist() == ["done"]


def test_run_failure_message_keeps_brackets_and_says_no_folder_when_none(tmp_path, monkeypatch):
    # a config that validates but fails while building: the message is printed literally
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import sys
        from lmech import experiments
        from lmech.experiments import grokking
        def broken(cfg, run, seed):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0")
        grokking.EXPERIMENT.run = broken
        from lmech.cli import main
        sys.argv = ["lmech", "run", "grokking", "--out", sys.argv[1]]
        main()
    """))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "[enforce fail at alloc_cpu.cpp:127] err == 0" in result.stderr
    assert "run folder kept, status 'failed'" in result.stderr


def test_identical_runs_in_the_same_second_get_distinct_ids(tmp_path, monkeypatch):
    import lmech.runs.store as store_module

    class Frozen(store_module._dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(store_module._dt, "datetime", Frozen)
    store = RunStore(tmp_path)
    ids = []
    for _ in range(3):
        with store.create("grokking", {"x": 1}, seed=0) as run:
            ids.append(run.id)
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"
    # a race: another process renames its folder into place between our check and our rename
    real = store_module.RunStore._create
    calls = []

    def racing(self, *args):
        if not calls:
            calls.append(args[4])
            (self.root / args[4] / "metrics").mkdir(parents=True)  # the other process's folder
            (self.root / args[4] / "config.json").write_text("{}")
        return real(self, *args)

    monkeypatch.setattr(store_module.RunStore, "_create", racing)
    with store.create("grokking", {"x": 2}, seed=0) as run:
        assert run.id == calls[0] + "-2"


def test_two_identical_runs_started_together_both_finish(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "lmech.cli", "run", "grokking", *TINY, "--out",
                               str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [1, 1], results  # both finished; their check fails (30 steps)
    runs = RunStore(tmp_path / "store").runs()
    assert len(runs) == 2 and set(runs["state"]) == {"done"}


def test_a_diverged_run_records_its_last_finite_step(tmp_path):
    from lmech.experiments import run_experiment

    sets = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 40, "eval_every": 50,
            "width": 16, "batch_size": 32, "lr": 1e6}
    summary = run_experiment("grokking", sets, out=tmp_path)
    status = RunStore(tmp_path).status(summary["id"])
    assert status["state"] == "diverged" and status["last_step"] > 0
    assert f"last finite at step {status['last_step']}" in status["message"]


README_MONITOR = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
loss_fn = nn.functional.mse_loss
x_probe, y_probe = torch.randn(64, 4), torch.randn(64, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
steps = 201

def train_step():
    opt.zero_grad(); loss_fn(model(x_probe), y_probe).backward(); opt.step()
"""


def _readme_block(start: str) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index(start):]
    return block[:block.index("```")]


def test_the_readme_monitor_snippet_keeps_its_metrics_and_finishes_the_run(tmp_path):
    snippet = _readme_block("from lmech import Monitor").replace("...  ", "train_step()")
    script = tmp_path / "snippet.py"
    script.write_text(README_MONITOR + snippet)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    store = RunStore(tmp_path / "runs")
    (run_id,) = store.runs()["id"]
    assert store.status(run_id)["state"] == "done"
    metrics = store.metrics(run_id, wide=True)
    assert sorted(metrics["step"]) == [0, 100, 200] and "sharpness/lambda_1" in metrics


def test_a_loop_that_never_closes_its_run_loses_no_metrics(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(README_MONITOR + textwrap.dedent("""
        from lmech import Monitor
        from lmech.runs import RunStore
        run = RunStore("runs").create("my-run", config={}, seed=0)
        monitor = Monitor(model, loss_fn, (x_probe, y_probe), probes="economy", every=100, sinks=[run])
        for step in range(steps):
            train_step()
            monitor.step(step, optimizer=opt)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    store = RunStore(tmp_path / "runs")
    (run_id,) = store.runs()["id"]
    time.sleep(0.1)
    assert store.status(run_id)["state"] == "incomplete"
    assert sorted(store.metrics(run_id, wide=True)["step"]) == [0, 100, 200]


def test_list_is_one_line_per_entry_and_show_lists_the_keys():
    listing = lmech("list")
    from lmech import experiments

    assert listing.returncode == 0 and len(listing.stdout.strip().splitlines()) == len(experiments.names())
    shown = lmech("show", "grokking")
    assert shown.returncode == 0
    for key in ("train_fraction", "checkpoint_every", "patience"):
        assert key in shown.stdout
    assert "transformer | mlp" in shown.stdout and "share of the equations used for training" in shown.stdout
    assert_bad_input(lmech("show", "nosuch"), "unknown experiment 'nosuch'", Path("/nonexistent"))


def test_a_finished_run_has_no_empty_parts_folders(tmp_path):
    from lmech.experiments import run_experiment

    summary = run_experiment("grokking", {"model": "mlp", "p": 11, "steps": 20, "eval_every": 10, "width": 8},
                             out=tmp_path)
    folder = Path(summary["path"])
    assert not (folder / "metrics").exists() and not (folder / "arrays").exists()
    assert (folder / "metrics.parquet").exists() and len(RunStore(tmp_path).metrics(summary["id"])) > 0


def test_an_out_that_cannot_be_written_exits_2(tmp_path, monkeypatch):
    # a read-only file system (root ignores permission bits, so the check itself is made to fail here)
    from typer.testing import CliRunner

    import lmech.cli

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    out = tmp_path / "store"
    for command in (["run", "grokking", *TINY], ["sweep", "grokking", *TINY], ["verify", "deep-linear"]):
        result = CliRunner().invoke(lmech.cli.app, [*command, "--out", str(out)])
        assert result.exit_code == 2 and "cannot be written" in result.stderr and not out.exists(), result.output
