"""The local executor: each run in its own process, at most ``workers`` at a time, one thread each.

Why a process per run (started from a forkserver) rather than a pool of long-lived workers: when a
worker process dies (segfault, out-of-memory kill, ``os._exit``), :class:`concurrent.futures.
ProcessPoolExecutor` breaks the whole pool and cannot say which task killed it. With one process
per run the dead process names its run, which is recorded ``failed`` ("worker process died:
killed by SIGKILL") while the other runs go on. The forkserver imports torch, matplotlib and the
sweep's experiment module once (``set_forkserver_preload``, :func:`lmech.sweeps.worker.warm_up`),
so starting a run costs a ``fork``, not a fresh interpreter (spawn is used where forkserver does
not exist, e.g. Windows).

Run processes do not re-import the driver's ``__main__`` module (it is hidden while they start):
everything a run needs is in lmech and the experiment's catalog module.

Each run process watches its parent (the driver): if the driver dies, even by SIGKILL, the run
process exits at once, leaving its run folder ``running`` with a dead pid, which the store reads
as ``incomplete`` and the next invocation of the sweep re-runs. Ctrl-C stops the runs the same way.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import threading
import types
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Callable

from lmech.sweeps.plan import RunSpec


def context(preload: list[str]) -> mp.context.BaseContext:
    """The forkserver context with ``preload`` imported in the server (spawn where it does not exist).

    The preload list only counts when this process starts its forkserver (the first sweep); later
    sweeps of other experiments import their module once per run.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lmech.sweeps._forkserver_preload", *preload])
        return ctx
    return mp.get_context("spawn")


def run_local(specs: list[RunSpec], workers: int, on_start: Callable[[RunSpec], None],
              on_finish: Callable[[RunSpec, dict], None]) -> None:
    """Run ``specs`` in at most ``workers`` processes; call back as each starts and finishes."""
    from lmech.sweeps.worker import lost

    ctx = context(sorted({spec.module for spec in specs}))
    pending = deque(specs)
    active: dict = {}  # process sentinel -> [process, connection, spec, outcome]
    try:
        while pending or active:
            while pending and len(active) < workers:
                spec = pending.popleft()
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(spec, send), name=f"lmech-run-{spec.run_id}")
                with _main_module_hidden():
                    proc.start()
                send.close()
                active[proc.sentinel] = [proc, receive, spec, None]
                on_start(spec)
            by_conn = {slot[1]: slot for slot in active.values() if slot[1] is not None}
            ready = wait([*by_conn, *active])
            for conn in [r for r in ready if r in by_conn]:  # outcomes first, then exits
                slot = by_conn[conn]
                try:
                    slot[3] = conn.recv()
                except (EOFError, OSError):  # the process died without sending its outcome
                    pass
                conn.close()
                slot[1] = None
            for sentinel in [r for r in ready if not isinstance(r, Connection)]:
                proc, conn, spec, outcome = active.pop(sentinel)
                if conn is not None:
                    if outcome is None and conn.poll():
                        try:
                            outcome = conn.recv()
                        except (EOFError, OSError):
                            pass
                    conn.close()
                proc.join()
                if outcome is None:
                    outcome = lost(spec, _death_message(spec, proc.exitcode))
                on_finish(spec, outcome)
    finally:  # an exception or Ctrl-C in the driver: stop the runs (they are left incomplete)
        for proc, *_ in active.values():
            if proc.is_alive():
                proc.terminate()
        for proc, *_ in active.values():
            proc.join(timeout=10)


@contextlib.contextmanager
def _main_module_hidden():
    """Start processes without telling them the driver's ``__main__`` (see the module docstring).

    multiprocessing's spawn and forkserver children re-import the parent's main script unless it
    has no file; a run needs only lmech and its catalog module, so the main module is hidden while
    the process starts. Scripts then need no ``if __name__ == "__main__":`` guard, and drivers
    reading from stdin or in a notebook work.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _death_message(spec: RunSpec, exitcode: int | None) -> str:
    from pathlib import Path

    from lmech.sweeps.worker import describe_exit

    if (Path(spec.out) / spec.run_id).exists():
        return f"worker process died ({describe_exit(exitcode)}) before the run finished"
    return f"worker process died ({describe_exit(exitcode)}) before the run started; its traceback is on stderr"


def _child(spec: RunSpec, conn) -> None:
    _exit_with_parent()
    from lmech.sweeps.worker import execute

    outcome = execute(spec)
    conn.send(outcome)
    conn.close()


def _exit_with_parent() -> None:
    """Exit at once when the driver process dies (its sentinel pipe closes)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(70)

    threading.Thread(target=watch, name="lmech-parent-watch", daemon=True).start()
