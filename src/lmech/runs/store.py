"""The run store: one folder per run, Parquet metrics, a SQLite index across runs.

Layout of a store rooted at ``ROOT`` (default ``./runs``)::

    ROOT/index.sqlite              one row per run (id, experiment, sweep, config hash, seed, state, ...)
    ROOT/<run_id>/config.json      full config, seed, library versions, git commit
    ROOT/<run_id>/status.json      state (running | done | diverged | failed), message, last step, pid
    ROOT/<run_id>/metrics/part-*.parquet   scalar metrics, long format: step, name, value
    ROOT/<run_id>/arrays/part-*.parquet    array metrics (spectra, ...): step, name, values (list)
    ROOT/<run_id>/metrics.parquet  all parts compacted, written when the run ends
    ROOT/<run_id>/figures/*.png    figures
    ROOT/<run_id>/result.json      summary numbers an experiment reports (e.g. step to 95%)
    ROOT/<run_id>/checkpoint.pt    the training state to continue from (while unfinished; removed when done)
    ROOT/sweeps/<name>.json        a sweep's manifest: its spec and member run ids (lmech.sweeps)
    ROOT/.attempts/<run_id>/<n>/   earlier attempts of a re-run run, moved aside by :meth:`RunStore.retire`

Why it cannot be corrupted by a crash:

* every file is written to a temporary name in the same folder and ``os.replace``-d into place,
  so a reader sees the old file or the new one, never half of one;
* metrics are appended as new Parquet *parts* (never rewritten), so a run killed with SIGKILL keeps
  every part flushed before the kill; when ``metrics.parquet`` exists, readers use it and ignore
  leftover parts (a crash between compaction and cleanup cannot double-count);
* the SQLite index is only changed inside transactions (WAL journal), and it is a cache of the run
  folders: ``RunStore.reindex()`` rebuilds it from them;
* a run whose ``status.json`` says ``running`` but whose process is gone (same host, pid dead; or no
  heartbeat for ``STALE_AFTER_S``) is reported as ``incomplete``.

How an interrupted run continues: an experiment that checkpoints calls :meth:`Run.save_checkpoint`
(metrics are flushed first, so the checkpoint never runs ahead of what is on disk). When the run is
started again under the same id (a sweep re-runs an incomplete run: the old folder is moved to
``.attempts`` and a new one made), :meth:`Run.resume` finds the newest checkpoint among the earlier
attempts, copies that attempt's metrics up to the checkpoint's step into the new folder and returns
the state; the experiment then continues from that step.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import json
import math
import os
import shutil
import socket
import sqlite3
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmech.errors import DivergedError  # noqa: F401  (re-exported)
from lmech.runs.atomic import atomic_write_table, atomic_write_bytes, atomic_write_json
from lmech.runs.provenance import config_hash, provenance

DEFAULT_ROOT = "runs"
FLUSH_EVERY_S = 5.0
STALE_AFTER_S = 600.0
STATES = ("running", "done", "diverged", "failed", "incomplete")
CHECKPOINT = "checkpoint.pt"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a zombie (exited, not yet reaped; e.g. an orphan under a container's init) is dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


SCALAR_SCHEMA = pa.schema([("step", pa.int64()), ("name", pa.string()), ("value", pa.float64())])
ARRAY_SCHEMA = pa.schema([("step", pa.int64()), ("name", pa.string()), ("values", pa.list_(pa.float64()))])


def effective_state(status: dict) -> str:
    """The state a reader should believe: ``running`` becomes ``incomplete`` if its writer is gone."""
    state = status.get("state", "incomplete")
    if state != "running":
        return state
    if status.get("host") == socket.gethostname() and status.get("pid"):
        return "running" if _pid_alive(int(status["pid"])) else "incomplete"
    beat = status.get("heartbeat")
    if beat is None or time.time() - float(beat) > STALE_AFTER_S:
        return "incomplete"
    return "running"


_OPEN_RUNS: "weakref.WeakSet[Run]" = weakref.WeakSet()


@atexit.register
def _flush_open_runs() -> None:
    """At interpreter exit, write every unfinished run's buffered metrics (it then reads incomplete)."""
    for run in list(_OPEN_RUNS):
        if run.status.get("state") == "running" and run.path.exists():
            try:
                run.flush()
            except Exception:  # noqa: BLE001 - exit must go on; the run stays as its last flush left it
                pass


class Run:
    """A run being written. Create it with :meth:`RunStore.create`; use it as a context manager.

    ``log(step, loss=..., test_acc=...)`` records scalars, ``log_array(step, name, values)`` records
    an array, ``save_figure(fig, name)`` a matplotlib figure, ``set_result(**numbers)`` the summary.
    Metrics are buffered and flushed as a new Parquet part every ``FLUSH_EVERY_S`` seconds and at the
    end. Leaving the ``with`` block normally marks the run done; :class:`DivergedError` marks it
    diverged; any other exception marks it failed with its message (and is re-raised).
    """

    def __init__(self, store: "RunStore", run_id: str, path: Path, meta: dict):
        _OPEN_RUNS.add(self)  # flushed at interpreter exit if never finished (metrics are not lost)
        self.store = store
        self.id = run_id
        self.path = path
        self.meta = meta
        self.config: dict = meta["config"]
        self.on_log: list[Callable[[int, dict], None]] = []
        self._scalars: list[tuple[int, str, float]] = []
        self._arrays: list[tuple[int, str, list]] = []
        self._part = 0
        self._last_flush = time.monotonic()
        self._last_step = -1
        self._result: dict = {}
        self.status: dict = {}
        self.taken_up: dict | None = None  # the incomplete run this one continues (run_experiment)

    # -- writing -------------------------------------------------------------------------------
    def log(self, step: int, **values: float) -> None:
        step = int(step)
        clean = {}
        for name, value in values.items():
            value = float(value)
            self._scalars.append((step, name, value))
            clean[name] = value
        self._last_step = max(self._last_step, step)
        for callback in self.on_log:
            callback(step, clean)
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def log_array(self, step: int, name: str, values: Any) -> None:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
        self._arrays.append((int(step), name, arr.ravel().tolist()))

    def set_result(self, **numbers: Any) -> None:
        self._result.update(numbers)
        atomic_write_json(self.path / "result.json", self._result)

    def save_figure(self, fig: Any, name: str, formats: tuple[str, ...] = ("png",)) -> list[Path]:
        """Save a matplotlib figure as ``figures/<name>.<fmt>`` (atomically) and close it (pyplot keeps
        open figures alive; a long process saving many would accumulate them)."""
        out = []
        fig_dir = self.path / "figures"
        fig_dir.mkdir(exist_ok=True)
        for fmt in formats:
            target = fig_dir / f"{name}.{fmt}"
            tmp = fig_dir / f".{name}.{uuid.uuid4().hex[:8]}.{fmt}"
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
            os.replace(tmp, target)
            out.append(target)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return out

    def metrics(self, wide: bool = False):
        """This run's scalar metrics so far (flushes the buffer first); see :meth:`RunStore.metrics`."""
        self.flush()
        return self.store.metrics(self.path, wide=wide)

    def flush(self) -> None:
        """Append buffered metrics as new Parquet parts (each written atomically)."""
        self._last_flush = time.monotonic()
        if self._scalars:
            steps, names, values = zip(*self._scalars)
            table = pa.table({"step": steps, "name": names, "value": values}, schema=SCALAR_SCHEMA)
            (self.path / "metrics").mkdir(exist_ok=True)  # gone once a finished run compacted its parts
            atomic_write_table(self.path / "metrics" / f"part-{self._part:06d}.parquet", table)
            self._scalars = []
        if self._arrays:
            steps, names, values = zip(*self._arrays)
            table = pa.table({"step": steps, "name": names, "values": values}, schema=ARRAY_SCHEMA)
            (self.path / "arrays").mkdir(exist_ok=True)
            atomic_write_table(self.path / "arrays" / f"part-{self._part:06d}.parquet", table)
            self._arrays = []
        self._part += 1
        self._write_status("running")

    def finish(self, state: str = "done", message: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; use one of {', '.join(STATES)}")
        self.flush()
        self._compact()
        self._write_status(state, message)
        self.store._index_upsert(self.meta, self.status)
        if state in ("done", "diverged"):  # a final result: nothing left to continue from
            for folder in (self.path, *self.store.attempts(self.id)):
                (folder / CHECKPOINT).unlink(missing_ok=True)

    # -- continuing ----------------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict) -> None:
        """Save a training state from which this run can continue after ``step`` (atomically).

        ``state`` holds tensors, numbers, strings and containers of them (``torch.save`` with
        ``weights_only`` loading: model and optimizer ``state_dict()``s, RNG states). Metrics are
        flushed first, so every row up to ``step`` is on disk when the checkpoint exists.
        """
        import io

        import torch

        self.flush()
        buffer = io.BytesIO()
        torch.save({"step": int(step), "state": state}, buffer)
        atomic_write_bytes(self.path / CHECKPOINT, buffer.getvalue())
        self.status["checkpoint_step"] = int(step)
        self._write_status("running")

    def resume(self) -> tuple[int, dict] | None:
        """Continue from the newest checkpoint of an earlier attempt of this run, if there is one.

        Returns ``(step, state)`` as saved by :meth:`save_checkpoint` and copies that attempt's
        scalar and array metrics with ``step <= step`` into this run (later rows are dropped: the
        continued run logs them again). Returns ``None`` when no earlier attempt left a checkpoint.
        """
        import torch

        found = None
        for folder in self.store.attempts(self.id):
            path = folder / CHECKPOINT
            if path.exists():
                try:
                    saved = torch.load(path, weights_only=True)
                except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped, not fatal
                    continue
                if found is None or saved["step"] > found[1]["step"]:
                    found = (folder, saved)
        if found is None:
            return None
        folder, saved = found
        step = int(saved["step"])
        for sub, schema, rows in (("metrics", SCALAR_SCHEMA, self._scalars), ("arrays", ARRAY_SCHEMA, self._arrays)):
            table = _read_parts(folder, sub, schema).to_pydict()
            rows.extend(row for row in zip(*table.values()) if row[0] <= step)
        self._last_step = max(self._last_step, step)
        self.status["resumed_from"] = {"attempt": folder.name, "step": step}
        self.flush()
        return step, saved["state"]

    # -- internals -----------------------------------------------------------------------------
    def _compact(self) -> None:
        for sub, schema, target in (("metrics", SCALAR_SCHEMA, "metrics.parquet"),
                                    ("arrays", ARRAY_SCHEMA, "arrays.parquet")):
            parts = sorted((self.path / sub).glob("part-*.parquet"))
            tables = [pq.read_table(p) for p in parts]
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            atomic_write_table(self.path / target, table)
            for p in parts:  # readers prefer the compacted file, so removal order is irrelevant
                p.unlink(missing_ok=True)
            try:
                (self.path / sub).rmdir()  # the parts folder is empty now: a finished run has none
            except OSError:
                pass

    def _write_status(self, state: str, message: str = "") -> None:
        self.status = {
            **self.status,
            "state": state,
            "message": message,
            "last_step": self._last_step,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat": time.time(),
            "updated": _now(),
        }
        if state != "running":
            self.status["finished"] = _now()
        atomic_write_json(self.path / "status.json", self.status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.finish("done")
        elif isinstance(exc, DivergedError):
            if exc.last_good is not None:
                self._last_step = max(self._last_step, int(exc.last_good))
            self.finish("diverged", str(exc) or "loss is not finite")
            return True  # a diverged run is a result, not an error
        elif isinstance(exc, KeyboardInterrupt):
            self.flush()  # leaves state 'running' -> read back as incomplete once we exit
        else:
            self.finish("failed", f"{type(exc).__name__}: {exc}")
        return False


INDEX_LOCK_TIMEOUT_S = 60  # how long a process waits for another's write lock on the index


def _prepare_index(con: sqlite3.Connection) -> None:
    """WAL mode and the ``runs`` table, retried while another process holds the database lock.

    Switching a new database file to WAL needs an exclusive lock, and SQLite answers a competing
    opener with "database is locked" at once instead of waiting for the busy timeout: the workers
    of a sweep that open a fresh store together hit it (a CI failure; reproduced by
    ``test_processes_opening_a_fresh_store_together_all_succeed``, which fails without this). So
    the switch is made only when the file is not in WAL mode yet, and retried with backoff for up
    to ``INDEX_LOCK_TIMEOUT_S``.
    """
    deadline = time.monotonic() + INDEX_LOCK_TIMEOUT_S
    delay = 0.002
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            con.execute(
                "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, experiment TEXT, sweep TEXT, "
                "config_hash TEXT, seed INTEGER, state TEXT, message TEXT, last_step INTEGER, "
                "created TEXT, finished TEXT, config TEXT)"
            )
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.1)


@dataclass
class RunStore:
    """A folder of runs plus its SQLite index. ``RunStore("runs")``."""

    root: Path = Path(DEFAULT_ROOT)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.index_path.exists():
            self._heal_index()

    # -- index -----------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.index_path, timeout=INDEX_LOCK_TIMEOUT_S)
        try:
            _prepare_index(con)
            with con:  # one transaction
                yield con
        finally:
            con.close()

    @staticmethod
    def _upsert(con: sqlite3.Connection, meta: dict, status: dict) -> None:
        row = (meta["id"], meta["experiment"], meta.get("sweep"), meta["config_hash"], meta["seed"],
               status.get("state"), status.get("message", ""), status.get("last_step", -1),
               meta["created"], status.get("finished"), json.dumps(meta["config"], sort_keys=True))
        con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)

    def _index_upsert(self, meta: dict, status: dict) -> None:
        with self._db() as con:
            self._upsert(con, meta, status)

    def _run_folders(self) -> set[str]:
        # dot-folders are not runs: .staging-* (a create cut short) and .attempts (moved-aside runs)
        return {p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / "config.json").exists()}

    def _heal_index(self) -> None:
        """Add folders the index lacks and drop rows whose folder is gone.

        Creating and retiring a run each pair a rename with an index write inside one SQLite
        transaction, so only a process killed between the rename and the commit leaves the two out
        of step; opening the store repairs that from the folders. The repair re-reads both under
        SQLite's write lock, which a create or retire holds from its index write to its commit, so
        it never sees one of those half done.
        """
        with self._db() as con:
            ids = {row[0] for row in con.execute("SELECT id FROM runs")}
        if ids == self._run_folders():
            return
        with self._db() as con:
            if not con.in_transaction:
                con.execute("BEGIN IMMEDIATE")
            ids = {row[0] for row in con.execute("SELECT id FROM runs")}
            folders = self._run_folders()
            for run_id in sorted(folders - ids):
                meta = json.loads((self.root / run_id / "config.json").read_text())
                self._upsert(con, meta, self._read_status(self.root / run_id))
            con.executemany("DELETE FROM runs WHERE id = ?", [(run_id,) for run_id in ids - folders])

    def reindex(self) -> int:
        """Rebuild the index from the run folders (the folders are the source of truth)."""
        rows = 0
        with self._db() as con:
            con.execute("DELETE FROM runs")
        for name in sorted(self._run_folders()) if self.root.exists() else []:
            folder = self.root / name
            meta = json.loads((folder / "config.json").read_text())
            self._index_upsert(meta, self._read_status(folder))
            rows += 1
        return rows

    # -- creating --------------------------------------------------------------------------------
    def create(self, experiment: str, config: dict, seed: int, sweep: str | None = None,
               run_id: str | None = None) -> Run:
        """Make a new run folder (atomically: built under a temporary name, then renamed).

        Without ``run_id`` the id is ``<experiment>-<time>-<config hash>``, with ``-2``, ``-3``, ...
        appended when another run (another process, the same second) already took it.
        """
        chash = config_hash(experiment, config, seed)
        if run_id is not None:
            return self._create(experiment, config, seed, sweep, run_id, chash)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{experiment}-{stamp}-{chash[:8]}"
        for n in range(1, 1000):
            candidate = base if n == 1 else f"{base}-{n}"
            if (self.root / candidate).exists():
                continue
            try:
                return self._create(experiment, config, seed, sweep, candidate, chash)
            except FileExistsError:  # taken between the check and the rename
                continue
        raise FileExistsError(f"no free run id for {base} in {self.root}")

    def _create(self, experiment: str, config: dict, seed: int, sweep: str | None, run_id: str, chash: str) -> Run:
        path = self.root / run_id
        if path.exists():
            raise FileExistsError(f"run folder {path} already exists; pick another id or --out")
        meta = {"id": run_id, "experiment": experiment, "sweep": sweep, "seed": int(seed),
                "config_hash": chash, "config": config, "created": _now(), **provenance()}
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{run_id}-{uuid.uuid4().hex[:6]}"
        for sub in ("metrics", "arrays", "figures"):
            (staging / sub).mkdir(parents=True)
        atomic_write_json(staging / "config.json", meta)
        try:
            run = Run(self, run_id, staging, meta)
            run._write_status("running")
            with self._db() as con:  # the row commits only if the rename happened
                self._upsert(con, meta, run.status)
                try:
                    os.replace(staging, path)
                except OSError as err:
                    if err.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another process made this run id
                        raise FileExistsError(f"run folder {path} already exists") from err
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-made stays behind
            raise
        run.path = path
        return run

    # -- reading ---------------------------------------------------------------------------------
    def _read_status(self, folder: Path) -> dict:
        try:
            status = json.loads((folder / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            status = {"state": "incomplete", "message": "no readable status.json"}
        status["state"] = effective_state(status)
        return status

    def resolve(self, run: str | Path) -> Path:
        """A run folder from an id, an id prefix, or a path."""
        path = Path(run)
        if (path / "config.json").exists():
            return path
        if (self.root / str(run) / "config.json").exists():
            return self.root / str(run)
        matches = [p for p in self.root.glob(f"{run}*") if (p / "config.json").exists()] if self.root.exists() else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise KeyError(f"no run {run!r} in {self.root}; `lmech runs --out {self.root}` lists them")
        raise KeyError(f"run id {run!r} is ambiguous in {self.root}: {', '.join(p.name for p in matches[:5])}")

    def runs(self, experiment: str | None = None, sweep: str | None = None):
        """One row per run (a pandas DataFrame), with the effective state read from each folder."""
        import pandas as pd

        if not self.index_path.exists():
            return pd.DataFrame(columns=["id", "experiment", "sweep", "config_hash", "seed", "state",
                                         "message", "last_step", "created", "finished", "config"])
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if experiment:
            query, args = query + " AND experiment = ?", [*args, experiment]
        members = self.sweep_members(sweep) if sweep else None
        if sweep and members is None:
            query, args = query + " AND sweep = ?", [*args, sweep]
        with self._db() as con:
            df = pd.read_sql_query(query + " ORDER BY created, id", con, params=args)
        if members is not None:  # a sweep's members include runs it reused from other sweeps
            df = df[df["id"].isin(members)].reset_index(drop=True)
        # the folder's status is authoritative (the index may lag behind a killed writer)
        states, steps, messages = [], [], []
        for run_id, state in zip(df["id"], df["state"]):
            folder = self.root / run_id
            status = self._read_status(folder) if folder.exists() else {"state": "missing"}
            states.append(status["state"])
            steps.append(status.get("last_step", -1))
            messages.append(status.get("message", ""))
        df["state"], df["last_step"], df["message"] = states, steps, messages
        return df

    def metrics(self, run: str | Path, wide: bool = False):
        """Scalar metrics of one run as a DataFrame (long: step, name, value; or wide by step)."""
        import pandas as pd

        folder = self.resolve(run)
        table = _read_parts(folder, "metrics", SCALAR_SCHEMA)
        df = table.to_pandas()
        if wide:
            df = df.pivot_table(index="step", columns="name", values="value", aggfunc="last").reset_index()
            df.columns.name = None
        return df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)

    def arrays(self, run: str | Path, name: str | None = None):
        df = _read_parts(self.resolve(run), "arrays", ARRAY_SCHEMA).to_pandas()
        return df if name is None else df[df["name"] == name].reset_index(drop=True)

    def sweep_members(self, sweep: str) -> list[str] | None:
        """Run ids listed in the sweep's manifest ``ROOT/sweeps/<sweep>.json``; None if it has none.

        A sweep identifies runs by the hash of their config and seed, so a run created by one sweep
        can belong to another that asked for the same computation; the manifest is the membership.
        """
        path = self.root / "sweeps" / f"{sweep}.json"
        if not path.exists():
            return None
        return [entry["run_id"] for entry in json.loads(path.read_text())["runs"]]

    def retire(self, run: str) -> Path:
        """Move a run folder aside (one atomic rename) so that its id can be run again.

        The folder goes to ``ROOT/.attempts/<run_id>/<n>`` (n = 1, 2, ...): nothing is deleted, an
        earlier failed or interrupted attempt stays readable there, and the index row is dropped
        (only its training checkpoint is removed, once the run under this id finishes).
        """
        path = self.root / run
        attempts = self.root / ".attempts" / run
        attempts.mkdir(parents=True, exist_ok=True)
        n = 1 + max((int(p.name) for p in attempts.iterdir() if p.name.isdigit()), default=0)
        target = attempts / str(n)
        with self._db() as con:  # the delete commits only if the rename happened
            con.execute("DELETE FROM runs WHERE id = ?", (run,))
            os.rename(path, target)  # same file system: atomic; fails rather than overwrite
        return target

    def attempts(self, run: str) -> list[Path]:
        """Earlier attempts of ``run`` moved aside by :meth:`retire`, newest first."""
        folder = self.root / ".attempts" / run
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))

    def checkpoint_step(self, run: str) -> int | None:
        """The step of the checkpoint in ``run``'s folder, or ``None`` if it has no readable one."""
        import torch

        path = self.resolve(run) / CHECKPOINT
        try:
            return int(torch.load(path, weights_only=True)["step"]) if path.exists() else None
        except Exception:  # noqa: BLE001 - a checkpoint cut short is no checkpoint
            return None

    def incomplete_copy(self, experiment: str, config: dict, seed: int, sweep: str | None = None) -> str | None:
        """The newest run outside any sweep, of this experiment, config and seed, whose writer died
        (state ``incomplete``), or ``None``: what ``lmech run`` continues instead of starting over."""
        if not self.index_path.exists():
            return None
        chash = config_hash(experiment, config, seed)
        df = self.runs(experiment=experiment)
        df = df[(df["config_hash"] == chash) & (df["state"] == "incomplete") & df["sweep"].isna()]
        return None if df.empty else str(df["id"].iloc[-1])

    def mark_failed(self, run: str, message: str) -> dict:
        """Record an unfinished run as failed (its writer died; e.g. a worker process was killed).

        A run that already reached a final state (done, diverged, failed) is left as it is. Returns
        the run's status afterwards.
        """
        folder = self.resolve(run)
        status = self._read_status(folder)
        if status["state"] in ("done", "diverged", "failed"):
            return status
        status = {**status, "state": "failed", "message": message, "updated": _now(), "finished": _now()}
        atomic_write_json(folder / "status.json", status)
        self._index_upsert(json.loads((folder / "config.json").read_text()), status)
        return status

    def config(self, run: str | Path) -> dict:
        return json.loads((self.resolve(run) / "config.json").read_text())

    def status(self, run: str | Path) -> dict:
        return self._read_status(self.resolve(run))

    def result(self, run: str | Path) -> dict:
        path = self.resolve(run) / "result.json"
        return json.loads(path.read_text()) if path.exists() else {}


def _read_parts(folder: Path, sub: str, schema: pa.Schema) -> pa.Table:
    compacted = folder / f"{sub}.parquet"
    if compacted.exists():
        return pq.read_table(compacted)
    parts = sorted((folder / sub).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else schema.empty_table()


def load(run: str | Path | None = None, root: str | Path = DEFAULT_ROOT, experiment: str | None = None,
         sweep: str | None = None, wide: bool = False):
    """Metrics as a pandas DataFrame.

    ``load("grokking-2026...")`` gives one run's metrics (columns step, name, value; ``wide=True``
    pivots to one column per metric). ``load(experiment="grokking")`` or ``load(sweep=...)`` gives
    every matching run's metrics with ``run_id``, ``seed`` and ``state`` columns added, read by one
    DuckDB ``read_parquet`` query over all the runs' Parquet files (each run's compacted
    ``metrics.parquet``, or its parts while it is unfinished), in index order, then step order.
    A sweep's grid values per run are in :func:`lmech.sweeps.summary` (join on ``run_id``).
    """
    import duckdb

    store = RunStore(Path(root))
    if run is not None:
        return store.metrics(run, wide=wide)
    index = store.runs(experiment=experiment, sweep=sweep)
    for attempt in range(3):  # an unfinished run may compact its parts between listing and reading
        try:
            df = _read_runs_metrics(store, index)
            break
        except duckdb.IOException:
            if attempt == 2:
                raise
    if wide and not df.empty:
        df = df.pivot_table(index=["run_id", "seed", "state", "step"], columns="name", values="value",
                            aggfunc="last", sort=False).reset_index()
        df.columns.name = None
    return df


def _read_runs_metrics(store: "RunStore", index) -> "pd.DataFrame":
    import duckdb
    import pandas as pd

    files = []
    for order, row in enumerate(index.itertuples()):
        folder = store.root / row.id
        compacted = folder / "metrics.parquet"
        paths = [compacted] if compacted.exists() else sorted((folder / "metrics").glob("part-*.parquet"))
        files += [(str(path.resolve()), order, part, row.id, int(row.seed), row.state)
                  for part, path in enumerate(paths)]
    if not files:
        return pd.DataFrame({"run_id": pd.Series(dtype=object), "seed": pd.Series(dtype="int64"),
                             "state": pd.Series(dtype=object), "step": pd.Series(dtype="int64"),
                             "name": pd.Series(dtype=object), "value": pd.Series(dtype="float64")})
    listing = pd.DataFrame(files, columns=["file", "run_order", "part", "run_id", "seed", "state"])
    with duckdb.connect() as con:
        con.register("listing", listing)
        return con.execute(
            "SELECT f.run_id, f.seed, f.state, m.step, m.name, m.value "
            "FROM read_parquet(?, filename = true, file_row_number = true) AS m "
            "JOIN listing AS f ON m.filename = f.file "
            "ORDER BY f.run_order, f.part, m.file_row_number",
            [listing["file"].tolist()],
        ).df()


def is_finite(*values: float) -> bool:
    return all(math.isfinite(float(v)) for v in values)
