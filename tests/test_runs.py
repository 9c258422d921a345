import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmech.runs import DivergedError, RunStore, config_hash, load


def test_run_roundtrip(store_root):
    store = RunStore(store_root)
    with store.create("demo", {"lr": 0.1}, seed=3) as run:
        for step in range(5):
            run.log(step, loss=1.0 / (step + 1), acc=step / 10)
        run.log_array(4, "spectrum", [3.0, 2.0, 1.0])
        run.set_result(best=0.4)
    df = load(run.id, root=store_root)
    assert set(df["name"]) == {"loss", "acc"}
    assert df[df.name == "loss"]["value"].tolist() == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    wide = load(run.id, root=store_root, wide=True)
    assert wide["acc"].tolist() == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert store.arrays(run.id, "spectrum")["values"][0].tolist() == [3.0, 2.0, 1.0]
    assert store.status(run.id)["state"] == "done"
    assert store.result(run.id) == {"best": 0.4}
    cfg = store.config(run.id)
    assert cfg["config"] == {"lr": 0.1} and cfg["seed"] == 3
    assert cfg["config_hash"] == config_hash("demo", {"lr": 0.1}, 3)
    assert "torch" in cfg["versions"]
    # compaction removed the parts, no temporary files are left behind
    assert not list((run.path / "metrics").glob("*")) and not list(run.path.rglob(".*tmp"))
    rows = store.runs()
    assert rows["id"].tolist() == [run.id] and rows["state"].tolist() == ["done"]


def test_failed_and_diverged_runs(store_root):
    store = RunStore(store_root)
    with pytest.raises(ZeroDivisionError):
        with store.create("demo", {}, seed=0) as run:
            run.log(0, loss=1.0)
            1 / 0
    status = store.status(run.id)
    assert status["state"] == "failed" and "ZeroDivisionError" in status["message"]
    with store.create("demo", {}, seed=1) as run2:
        run2.log(7, loss=2.0)
        raise DivergedError("loss became nan at step 8")
    status = store.status(run2.id)
    assert status["state"] == "diverged" and status["last_step"] == 7
    assert load(run2.id, root=store_root)["value"].tolist() == [2.0]  # metrics kept


def test_load_many_and_reindex(store_root):
    store = RunStore(store_root)
    for seed in range(3):
        with store.create("demo", {"x": 1}, seed=seed) as run:
            run.log(0, loss=float(seed))
    df = load(experiment="demo", root=store_root)
    assert sorted(df["seed"].tolist()) == [0, 1, 2]
    store.index_path.unlink()
    assert store.reindex() == 3
    assert len(store.runs()) == 3


def test_unknown_run_is_a_clear_error(store_root):
    RunStore(store_root).root.mkdir(parents=True)
    with pytest.raises(KeyError, match="no run 'nope'"):
        RunStore(store_root).metrics("nope")


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import lmech.runs.store as store_mod
    store_mod.FLUSH_EVERY_S = 0.0          # flush a Parquet part on every log call
    store = store_mod.RunStore(sys.argv[1])
    run = store.create("demo", {"k": 1}, seed=0)
    step = 0
    while True:
        run.log(step, loss=1.0 / (step + 1))
        step += 1
        if step == 20:
            print(run.id, flush=True)
        time.sleep(0.005)
""")


def test_sigkill_mid_run_leaves_readable_incomplete_run(store_root, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(store_root)], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = RunStore(store_root)
    con = sqlite3.connect(store.index_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    rows = store.runs()
    assert rows["id"].tolist() == [run_id]
    assert rows["state"].tolist() == ["incomplete"]
    df = store.metrics(run_id)
    assert len(df) >= 20 and df["step"].is_monotonic_increasing
    assert json.loads((Path(store_root) / run_id / "config.json").read_text())["config"] == {"k": 1}
    # a later writer can use the same store as usual
    with store.create("demo", {"k": 2}, seed=0) as run:
        run.log(0, loss=0.5)
    assert sorted(store.runs()["state"]) == ["done", "incomplete"]


def test_load_many_equals_reading_each_run(store_root):
    """One DuckDB query over all Parquet files == the per-run reader, finished and unfinished runs alike."""
    import pandas as pd

    store = RunStore(store_root)
    with store.create("demo", {"x": 1}, seed=0) as run:
        for step in range(4):
            run.log(step, loss=1.0 / (step + 1), acc=step / 4)
    live = store.create("demo", {"x": 2}, seed=1)  # still being written: only parts on disk
    live.log(0, loss=5.0)
    live.flush()
    live.log(1, loss=4.0)
    live.flush()
    df = load(experiment="demo", root=store_root)
    expected = []
    for row in store.runs(experiment="demo").itertuples():
        one = store.metrics(row.id)
        one.insert(0, "run_id", row.id)
        one.insert(1, "seed", row.seed)
        one.insert(2, "state", row.state)
        expected.append(one)
    expected = pd.concat(expected, ignore_index=True)
    assert df.equals(expected.astype(df.dtypes.to_dict()))
    assert df[df.seed == 1]["value"].tolist() == [5.0, 4.0] and set(df[df.seed == 1]["state"]) == {"running"}
    wide = load(experiment="demo", root=store_root, wide=True)
    assert wide["loss"].tolist() == [1.0, 0.5, 1 / 3, 0.25, 5.0, 4.0]
    assert load(experiment="nothing", root=store_root).columns.tolist() == ["run_id", "seed", "state", "step",
                                                                             "name", "value"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_zombie_writer_reads_as_dead():
    """An exited, unreaped process (an orphan under an init that does not reap) is not a live writer."""
    from lmech.runs.store import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet waited for
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not _pid_alive(child.pid)
        assert _pid_alive(os.getpid())
    finally:
        child.wait()


def test_opening_the_store_heals_an_index_left_behind_by_a_killed_writer(store_root):
    """A process killed between a folder rename and its index commit leaves them out of step."""
    store = RunStore(store_root)
    kept = store.create("grokking", {"lr": 1e-3}, seed=0)
    kept.finish()
    lost_row = store.create("grokking", {"lr": 1e-2}, seed=0)
    lost_row.finish()
    gone = store.create("grokking", {"lr": 1e-1}, seed=0)
    gone.finish()
    con = sqlite3.connect(store.index_path)
    with con:
        con.execute("DELETE FROM runs WHERE id = ?", (lost_row.id,))  # renamed, never indexed
    con.close()
    os.rename(gone.path, store_root / ".elsewhere")  # index row whose folder vanished

    RunStore(store_root)
    con = sqlite3.connect(store.index_path)
    ids = sorted(row[0] for row in con.execute("SELECT id FROM runs"))
    state = con.execute("SELECT state FROM runs WHERE id = ?", (lost_row.id,)).fetchone()[0]
    con.close()
    assert ids == sorted([kept.id, lost_row.id])
    assert state == "done"


def _open_fresh_store_at(root, start, results):
    time.sleep(max(0.0, start - time.time()))  # all processes open the store at the same moment
    try:
        RunStore(root).create("demo", {"pid": os.getpid()}, seed=0, run_id=f"demo-{os.getpid()}").finish()
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(f"{type(err).__name__}: {err}")


def test_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    """Switching a new index file to WAL needs an exclusive lock that SQLite refuses at once
    ("database is locked") rather than after the busy timeout; a sweep's workers opening a fresh
    store together failed on it (CI). Ten fresh stores, four processes each."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(10):
        root = tmp_path / f"store{trial}"
        results = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_fresh_store_at, args=(root, start, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
        assert len(RunStore(root).runs()) == 4
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]


def test_a_create_that_fails_leaves_no_staging_folder(store_root, monkeypatch):
    store = RunStore(store_root)
    store.create("demo", {"a": 1}, seed=0).finish()

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(RunStore, "_upsert", staticmethod(locked))
    with pytest.raises(sqlite3.OperationalError):
        store.create("demo", {"a": 2}, seed=0)
    assert [p.name for p in store_root.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    assert len(RunStore(store_root).runs()) == 1
