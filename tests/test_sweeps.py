"""Sweeps: planning and validation, the local executor, resume after SIGKILL, failures, CLI."""

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmech import experiments
from lmech.contract import register, unregister
from lmech.cli import app
from lmech.errors import ConfigError
from lmech.runs import RunStore, config_hash, load
from lmech.sweeps import plan_sweep, run_sweep, summary

TESTS = Path(__file__).resolve().parent
# a grokking run that takes well under a second of compute
TINY = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 40, "eval_every": 10, "width": 16,
        "batch_size": 32}
TINY_SETS = [f"{k}={v}" for k, v in TINY.items()]


@pytest.fixture
def toy(monkeypatch):
    """Register the test-only experiment tests/sweep_toy.py as catalog entry 'sweep-toy'."""
    monkeypatch.syspath_prepend(str(TESTS))
    register("sweep-toy", "sweep_toy")
    yield "sweep-toy"
    unregister("sweep-toy")


def assert_store_consistent(root: Path) -> None:
    """SQLite index intact, one row per run folder, and no run reads finished without its files."""
    store = RunStore(root)
    con = sqlite3.connect(store.index_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = [r[0] for r in con.execute("SELECT id FROM runs")]
    con.close()
    folders = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "config.json").exists())
    assert store.reindex() == len(folders)  # the index is a cache of the folders: rebuilding it changes nothing
    assert sorted(store.runs()["id"]) == folders
    assert sorted(ids) == folders and len(set(ids)) == len(ids)
    for run_id in folders:
        state = store.status(run_id)["state"]
        store.metrics(run_id)  # readable, whatever the state
        if state in ("done", "diverged"):  # finished by its own process: compacted
            assert (root / run_id / "metrics.parquet").exists(), run_id
        if state == "done":
            assert (root / run_id / "result.json").exists(), run_id


# -- planning and validation ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"grid": {"bogus": [1, 2]}}, "unknown key 'bogus' for experiment 'grokking'"),
    ({"grid": {"lr": ["fast", 1e-3]}}, "bad value for lr: 'fast' is not a number"),
    ({"grid": {"model": ["mlp", "cnn"]}}, "is not one of transformer, mlp"),
    ({"grid": {"lr": []}}, "grid lr has no values"),
    ({"grid": {"lr": 0.1}}, "grid lr must be a list"),
    ({"grid": {"lr": [0.1, 1e-1]}}, "lists 0.1 twice"),
    ({"sets": {"lr": 0.1}, "grid": {"lr": [1e-3]}}, "both fixed (--set) and swept (--grid)"),
    ({"grid": {"width": [30, 32]}, "sets": {"heads": 4}}, "width (30) must be divisible by heads (4) (grid point width=30)"),
    ({"grid": {"lr": [1e-3, -1.0]}}, "lr must be positive, got -1.0 (grid point lr=-1.0)"),
    ({"seeds": 0}, "seeds must be at least 1"),
    ({"seeds": [1, 1]}, "without repeats"),
    ({"random": 0}, "random must be a positive number"),
    ({"name": "a/b"}, "bad sweep name"),
    ({"executor": "slurm"}, "unknown executor 'slurm'"),
    ({"workers": 0}, "workers must be a positive integer"),
    ({"address": "auto"}, "--address is for the ray executor"),
])
def test_bad_sweeps_are_refused_before_anything_is_written(store_root, kwargs, message):
    with pytest.raises(ConfigError) as err:
        run_sweep("grokking", out=store_root, progress=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not store_root.exists()


def test_ray_executor_without_ray_is_a_clear_error(store_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'lmech\[ray\]'"):
        run_sweep("grokking", executor="ray", out=store_root, progress=False)
    assert not store_root.exists()


def test_plan_ids_are_config_hashes_and_names_are_stable(store_root):
    plan = plan_sweep("grokking", sets=TINY_SETS, grid={"lr": ["1e-3", "1e-2"], "weight_decay": [0, 1]},
                      seeds=2,
                      out=store_root)
    assert len(plan.runs) == 8 and len({s.run_id for s in plan.runs}) == 8
    assert [(s.params["lr"], s.params["weight_decay"], s.seed) for s in plan.runs[:3]] == [
        (1e-3, 0.0, 0), (1e-3, 0.0, 1), (1e-3, 1.0, 0)]  # grid order, seeds innermost; values typed
    first = plan.runs[0]
    full = {**experiments.get("grokking").make_config(TINY).__dict__, "lr": 1e-3, "weight_decay": 0.0}
    assert first.config_hash == config_hash("grokking", full, 0)
    assert first.run_id == f"grokking-{first.config_hash[:12]}"
    # the name depends on what is computed, not on how it was typed, nor on seeds
    same = plan_sweep("grokking", sets=dict(reversed(list(TINY.items()))), grid={"weight_decay": [1.0, 0.0], "lr": [1e-2, 1e-3]},
                      seeds=[0, 1, 2], out=store_root)
    assert same.name == plan.name and plan.name.startswith("grokking-lr-weight_decay-")
    other = plan_sweep("grokking", sets=TINY_SETS, grid={"lr": [1e-3]}, out=store_root)
    assert other.name != plan.name
    assert not store_root.exists()


def test_random_search_is_seeded_order_free_and_nested(store_root):
    grid = {"lr": [1e-3, 3e-3, 1e-2], "beta1": [0.8, 0.9, 0.95], "weight_decay": [0.0, 1.0]}

    def points(n, g):
        plan = plan_sweep("grokking", sets=TINY, grid=g, random=n, out=store_root)
        return [tuple(sorted(s.params.items())) for s in plan.runs]

    three = points(3, grid)
    assert len(set(three)) == 3
    shuffled = {k: list(reversed(v)) for k, v in reversed(list(grid.items()))}
    assert set(points(3, shuffled)) == set(three)  # same sample whatever the typing order
    assert set(three) <= set(points(7, grid))  # a larger N extends a smaller one
    assert len(points(100, grid)) == 18  # N >= grid size: the whole grid


def test_worker_refuses_a_config_that_differs_from_the_drivers(store_root):
    import dataclasses

    from lmech.sweeps.worker import execute

    (spec,) = plan_sweep("grokking", sets=TINY, out=store_root).runs
    outcome = execute(dataclasses.replace(spec, config_hash="0" * 64))  # as if another lmech built it
    assert outcome["state"] == "failed" and "different config from the driver's" in outcome["message"]
    assert not store_root.exists()


# -- running, resuming, failures ------------------------------------------------------------------
def test_sweep_runs_then_resumes_without_rerunning(store_root):
    kwargs = dict(sets=TINY, grid={"lr": [1e-3, 1e-2]}, seeds=2, workers=2, out=store_root, progress=False)
    df = run_sweep("grokking", **kwargs)
    assert df["state"].tolist() == ["done"] * 4 and df["ran"].all(), df[["run_id", "state", "message"]].to_string()
    assert df["lr"].tolist() == [1e-3, 1e-3, 1e-2, 1e-2] and df["seed"].tolist() == [0, 1, 0, 1]
    assert (df["steps_run"] == 40).all() and df["final_test_acc"].between(0, 1).all()
    store = RunStore(store_root)
    for row in df.itertuples():
        meta = store.config(row.run_id)
        assert row.run_id == f"grokking-{meta['config_hash'][:12]}" and meta["seed"] == row.seed
        assert meta["config"]["lr"] == row.lr and meta["sweep"] == df.attrs["sweep"]
    finished = {r: store.status(r)["finished"] for r in df["run_id"]}

    again = run_sweep("grokking", **kwargs)
    assert not again["ran"].any() and again["state"].tolist() == ["done"] * 4
    assert {r: store.status(r)["finished"] for r in df["run_id"]} == finished
    cols = ["run_id", "seed", "lr", "state", "final_test_acc"]
    assert again[cols].equals(df[cols])
    assert_store_consistent(store_root)

    # one DataFrame of every run's metrics, equal to reading each run on its own
    metrics = load(sweep=df.attrs["sweep"], root=store_root)
    assert sorted(metrics["run_id"].unique()) == sorted(df["run_id"])
    for run_id in df["run_id"]:
        alone = store.metrics(run_id)
        mine = metrics[metrics.run_id == run_id][["step", "name", "value"]].reset_index(drop=True)
        assert mine.equals(alone)
    wide = load(sweep=df.attrs["sweep"], root=store_root, wide=True)
    assert len(wide) == 4 * 5 and {"test_acc", "train_loss"} <= set(wide.columns)
    assert summary(df.attrs["sweep"], out=store_root)[cols].equals(df[cols])


def test_failed_diverged_and_dead_runs_do_not_stop_the_sweep(store_root, toy):
    df = run_sweep(toy, grid={"mode": ["ok", "raise", "nan", "exit", "sigkill"]}, workers=2, out=store_root,
                   progress=False)
    by_mode = df.set_index("mode")
    assert by_mode.loc["ok", "state"] == "done" and by_mode.loc["ok", "final_loss"] == pytest.approx(1 / 5)
    assert by_mode.loc["raise", "state"] == "failed"
    assert by_mode.loc["raise", "message"] == "ValueError: boom at step 2 (x=1.0)"
    assert by_mode.loc["nan", "state"] == "diverged" and "loss became nan at step 2" in by_mode.loc["nan", "message"]
    assert by_mode.loc["exit", "state"] == "failed"
    assert by_mode.loc["exit", "message"] == "worker process died (exit code 3) before the run finished"
    assert by_mode.loc["sigkill", "state"] == "failed" and "killed by SIGKILL" in by_mode.loc["sigkill", "message"]
    store = RunStore(store_root)
    assert store.metrics(by_mode.loc["nan", "run_id"])["step"].tolist() == [0, 1]  # kept up to the last good step
    assert store.metrics(by_mode.loc["exit", "run_id"])["step"].tolist() == [0, 1]  # flushed parts survive
    assert_store_consistent(store_root)


def test_failed_runs_rerun_only_with_retry_failed(store_root, toy):
    kwargs = dict(grid={"mode": ["ok", "raise"]}, seeds=1, workers=2, out=store_root, progress=False)
    first = run_sweep(toy, **kwargs)
    assert first["state"].tolist() == ["done", "failed"], first[["mode", "state", "message"]].to_dict("records")
    failed_id = first.set_index("mode").loc["raise", "run_id"]
    again = run_sweep(toy, **kwargs)
    assert not again["ran"].any() and again["state"].tolist() == ["done", "failed"], \
        again[["mode", "state", "message", "ran"]].to_dict("records")
    retried = run_sweep(toy, retry_failed=True, **kwargs)
    assert retried["ran"].tolist() == [False, True] and retried["state"].tolist() == ["done", "failed"]
    # the earlier attempt was moved aside, whole; the store still has one folder and one row per id
    attempt = store_root / ".attempts" / failed_id / "1"
    assert json.loads((attempt / "status.json").read_text())["state"] == "failed"
    assert json.loads((attempt / "config.json").read_text())["id"] == failed_id
    assert RunStore(store_root).runs()["id"].tolist().count(failed_id) == 1
    assert_store_consistent(store_root)


def test_sweeps_share_identical_runs(store_root):
    a = run_sweep("grokking", sets=TINY, grid={"lr": [1e-3, 1e-2]}, workers=2, out=store_root, progress=False)
    b = run_sweep("grokking", sets=TINY, grid={"lr": [1e-2, 3e-2]}, workers=2, out=store_root, progress=False)
    assert b["ran"].tolist() == [False, True]  # lr=1e-2 seed 0 is the same computation: reused
    assert b["run_id"][0] == a["run_id"][1]
    assert sorted(RunStore(store_root).runs(sweep=b.attrs["sweep"])["id"]) == sorted(b["run_id"])
    assert sorted(load(sweep=b.attrs["sweep"], root=store_root)["run_id"].unique()) == sorted(b["run_id"])
    assert len(RunStore(store_root).runs()) == 3


def test_nan_loss_marks_a_grokking_run_diverged(store_root):
    df = run_sweep("grokking", sets=TINY, grid={"lr": [1e-3, 1e6]}, workers=2, out=store_root, progress=False)
    assert df["state"].tolist() == ["done", "diverged"]
    assert "loss became nan" in df["message"][1]


# no `if __name__ == "__main__":` guard on purpose: run processes must not re-import the driver script
KILLED_SWEEP = textwrap.dedent("""
    import sys
    from lmech.sweeps import run_sweep
    run_sweep("grokking", sets={tiny!r}, grid={grid!r}, seeds=2, workers=2, out=sys.argv[1], progress=False)
""")


def test_sweep_killed_with_sigkill_resumes_only_missing_runs(store_root, tmp_path):
    grid = {"lr": [1e-3, 3e-3, 1e-2]}
    script = tmp_path / "sweep.py"
    script.write_text(KILLED_SWEEP.format(tiny=TINY, grid=grid))
    proc = subprocess.Popen([sys.executable, str(script), str(store_root)])
    store = RunStore(store_root)

    def states() -> dict:
        out = {}
        for path in store_root.glob("grokking-*/status.json"):
            try:
                out[path.parent.name] = store.status(path.parent.name)
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return out

    deadline = time.monotonic() + 240
    while sum(s["state"] == "done" for s in states().values()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended or hung before 2 runs finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the run processes exit with their driver; their runs read incomplete
    deadline = time.monotonic() + 30
    while any(s["state"] == "running" for s in states().values()):
        assert time.monotonic() < deadline, "run processes outlived their killed driver"
        time.sleep(0.05)
    before = states()
    done_before = {r: s["finished"] for r, s in before.items() if s["state"] == "done"}
    assert 2 <= len(done_before) < 6
    assert set(s["state"] for s in before.values()) <= {"done", "incomplete"}
    assert_store_consistent(store_root)

    df = run_sweep("grokking", sets=TINY, grid=grid, seeds=2, workers=2, out=store_root, progress=False)
    assert df["state"].tolist() == ["done"] * 6
    ran = set(df.loc[df["ran"], "run_id"])
    assert ran == set(df["run_id"]) - set(done_before)  # only the missing runs executed
    assert {r: store.status(r)["finished"] for r in done_before} == done_before  # finished runs untouched
    incomplete = {r for r, s in before.items() if s["state"] == "incomplete"}
    attempts = store_root / ".attempts"
    moved = {p.name for p in attempts.iterdir()} if attempts.exists() else set()
    assert moved == incomplete  # interrupted runs were moved aside whole, then run again
    assert_store_consistent(store_root)
    assert len(store.runs(sweep=df.attrs["sweep"])) == 6


# -- command line ---------------------------------------------------------------------------------
runner = CliRunner()
TINY_ARGS = [a for kv in TINY_SETS for a in ("--set", kv)]


@pytest.mark.parametrize("args, message", [
    (["--grid", "bogus=1,2"], "unknown key 'bogus'"),
    (["--grid", "lr=1e-3,fast"], "bad value for lr: 'fast' is not a number"),
    (["--grid", "lr"], "--grid 'lr' is not key=v1,v2,..."),
    (["--grid", "lr=1e-3", "--grid", "lr=1e-2"], "--grid lr is given twice"),
    (["--set", "steps=0"], "steps must be positive"),
    (["--executor", "slurm"], "unknown executor 'slurm'"),
])
def test_cli_bad_sweep_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "store"
    result = runner.invoke(app, ["sweep", "grokking", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_cli_sweep_and_runs_table(tmp_path):
    out = tmp_path / "store"
    args = ["sweep", "grokking", *TINY_ARGS, "--grid", "lr=1e-3,1e-2", "--seeds", "1", "--workers", "2",
            "--out", str(out), "--name", "cli-demo"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cli-demo" in result.output and result.output.count("done") >= 2
    listing = runner.invoke(app, ["runs", "--sweep", "cli-demo", "--out", str(out)])
    assert listing.exit_code == 0, listing.output
    lines = [line for line in listing.output.splitlines() if "grokking-" in line]
    df = summary("cli-demo", out=out)
    assert len(lines) == len(df) == 2
    for line, row, lr in zip(lines, df.itertuples(), ["0.001", "0.01"]):
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        assert cells[:4] == [row.run_id, lr, "0", "done"]
        assert f"{row.final_test_acc:.4g}" in cells  # a result number that varies across the sweep
    missing = runner.invoke(app, ["runs", "--sweep", "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "no sweep 'nope'" in missing.output and "cli-demo" in missing.output


# -- explicit points and seed order ---------------------------------------------------------------
def test_points_times_grid_seed_order_and_names(store_root):
    points = [{"optimizer": "adamw"}, {"optimizer": "poprisk", "gate": "soft", "alpha": "1"}]
    plan = plan_sweep("grokking", sets=TINY, points=points, grid={"lr": [1e-3, 3e-3]}, seeds=2, order="seeds",
                      out=store_root)
    assert [(s.seed, s.params) for s in plan.runs[:4]] == [
        (0, {"optimizer": "adamw", "lr": 1e-3}), (0, {"optimizer": "adamw", "lr": 3e-3}),
        (0, {"optimizer": "poprisk", "gate": "soft", "alpha": 1.0, "lr": 1e-3}),
        (0, {"optimizer": "poprisk", "gate": "soft", "alpha": 1.0, "lr": 3e-3})]
    assert [s.seed for s in plan.runs] == [0] * 4 + [1] * 4
    assert plan.grid_keys == ["optimizer", "gate", "alpha", "lr"]
    by_points = plan_sweep("grokking", sets=TINY, points=points, grid={"lr": [1e-3, 3e-3]}, seeds=2, out=store_root)
    assert by_points.name == plan.name and {s.run_id for s in by_points.runs} == {s.run_id for s in plan.runs}
    assert [s.seed for s in by_points.runs] == [0, 1] * 4
    assert plan_sweep("grokking", sets=TINY, points=points[:1], seeds=1, out=store_root).name != plan.name


@pytest.mark.parametrize("kwargs, message", [
    ({"points": [{"optimizer": "adamw"}, {"optimizer": "adamw"}]}, "is listed twice"),
    ({"points": [{"lr": 1e-3}], "grid": {"lr": [1e-2]}}, "lr is set by a point and also"),
    ({"points": [{"bogus": 1}]}, "unknown key 'bogus'"),
    ({"points": {"optimizer": "adamw"}}, "points must be a list of dicts"),
    ({"order": "random"}, "unknown order 'random'"),
])
def test_bad_points_and_orders_are_refused(store_root, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep("grokking", sets=TINY, out=store_root, **kwargs)
    assert not store_root.exists() or not any(store_root.iterdir())


def test_cli_points_run_and_bad_point_exits_2(tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(app, ["sweep", "grokking", *TINY_ARGS, "--point", "optimizer=adamw",
                                 "--point", "optimizer=grokfast", "--seeds", "1", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(RunStore(out).runs()["state"]) == ["done", "done"]
    bad = runner.invoke(app, ["sweep", "grokking", *TINY_ARGS, "--point", "optimizer", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "is not key=value" in bad.output and not (tmp_path / "b").exists()


def test_a_run_another_sweep_made_first_is_reported_not_failed(store_root):
    """Two identical sweeps at once: the second finds the run's folder made by the first; its outcome is
    the first's state with a plain message, not a FileExistsError."""
    from lmech.sweeps.worker import execute

    (spec,) = plan_sweep("grokking", sets=TINY, seeds=1, out=store_root).runs
    experiments.run_experiment("grokking", spec.overrides, seed=spec.seed, out=store_root, run_id=spec.run_id)
    outcome = execute(spec)
    assert outcome["state"] == "done" and outcome["message"] == "run by another sweep at the same time"
