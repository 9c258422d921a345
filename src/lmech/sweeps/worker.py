"""What runs inside a sweep worker (a local process or a Ray task): one run, one thread.

The local executor's forkserver calls :func:`warm_up` once (it imports
``lmech.sweeps._forkserver_preload``) before forking any run, to import what every run would
otherwise import on its own: torch, ``torch._dynamo`` (torch.optim's constructors import it
lazily) and matplotlib with the Agg backend, its fonts and mathtext loaded by drawing one
figure; the sweep's experiment module is preloaded too. These one-time costs are most of a short
run's time from a fresh interpreter (figures in docs/results/sweeps.md). Importing this module
has no side effects (the driver imports it too).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

import torch

from lmech import experiments
from lmech.contract import registry
from lmech.runs import RunStore, config_hash
from lmech.sweeps.plan import RunSpec


def warm_up() -> None:
    """Import the modules runs need, once, in the process that workers are forked from."""
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")  # workers write figures to files, never to a screen
    for module in ("torch._dynamo", "matplotlib.pyplot"):
        try:
            importlib.import_module(module)
        except ImportError:  # only a warm-up
            pass
    try:  # fonts and the mathtext parser load on first use (about 1 s): once here, not once per run
        import io

        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2, 2))
        ax.semilogy([1, 10], [1, 100], label="$x$")
        ax.legend()
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
        plt.close(fig)
    except Exception:  # noqa: BLE001 - only a warm-up
        pass



def execute(spec: RunSpec) -> dict:
    """Run ``spec`` into its store with one torch thread; never raises for a run's own error.

    Returns the outcome ``{run_id, state, message, result, wall_s, pid, host}``. A run that raises
    is recorded ``failed`` by the run store (with ``"ExceptionType: message"``), a DivergedError
    ``diverged``; the outcome repeats what the store recorded.
    """
    torch.set_num_threads(1)
    if spec.experiment not in registry.names():  # registered at run time in the driver, not here
        registry.register(spec.experiment, spec.module)
    start = time.perf_counter()
    cfg, mismatch = _build_config(spec)
    if mismatch:
        return {"run_id": spec.run_id, "state": "failed", "message": mismatch, "result": {}, "wall_s": 0.0,
                "pid": os.getpid(), "host": socket.gethostname()}
    try:
        summary = experiments.run_experiment(spec.experiment, config=cfg, seed=spec.seed, out=spec.out,
                                             sweep=spec.sweep, run_id=spec.run_id)
        state, message, result = summary["state"], summary["message"], summary["result"]
    except FileExistsError:  # another sweep (or invocation) made this run first and is running or ran it
        store = RunStore(spec.out)
        status = store.status(spec.run_id)
        state, message, result = status["state"], "run by another sweep at the same time", store.result(spec.run_id)
    except Exception as err:  # recorded in the run folder as failed (if the folder was made)
        state, message, result = "failed", f"{type(err).__name__}: {err}", {}
        store = RunStore(spec.out)
        if (store.root / spec.run_id / "config.json").exists():
            status = store.status(spec.run_id)
            state, message = status["state"], status.get("message") or message
            result = store.result(spec.run_id)
    return {"run_id": spec.run_id, "state": state, "message": message, "result": result,
            "wall_s": time.perf_counter() - start, "pid": os.getpid(), "host": socket.gethostname()}


def _build_config(spec: RunSpec) -> tuple[object | None, str | None]:
    """``(config, None)``, or ``(None, why not)``: the worker builds the config once, from the spec, and
    it must be the very config the driver hashed (e.g. not a Ray node with another lmech); the run
    then takes it ready (nothing is parsed twice)."""
    try:
        cfg = registry.get(spec.experiment).make_config(spec.overrides, quick=spec.quick)
    except Exception as err:  # noqa: BLE001 - reported as the run's failure
        return None, f"the worker cannot build this run's config: {type(err).__name__}: {err}"
    if config_hash(spec.experiment, dataclasses.asdict(cfg), spec.seed) != spec.config_hash:
        return None, ("the worker built a different config from the driver's (is the same lmech version installed "
                      "on every node?); run not started")
    return cfg, None


def lost(spec: RunSpec, reason: str) -> dict:
    """The outcome of a run whose worker died before reporting: marked failed in the store.

    A run that had already reached a final state before its process died keeps that state.
    """
    store = RunStore(spec.out)
    state, message, result = "failed", reason, {}
    if (store.root / spec.run_id / "config.json").exists():
        status = store.mark_failed(spec.run_id, reason)
        state, message, result = status["state"], status.get("message", ""), store.result(spec.run_id)
    return {"run_id": spec.run_id, "state": state, "message": message, "result": result,
            "wall_s": float("nan"), "pid": None, "host": socket.gethostname()}


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``'killed by SIGKILL'``; ``3`` -> ``'exit code 3'``."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
