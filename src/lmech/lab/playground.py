"""The lab's playground: a small form over a catalog experiment, and runs started in the background.

A playground entry is an experiment name from the catalog; its form shows the keys of
``FORM_KEYS`` that the experiment's config dataclass has (so ``label-noise`` gets task, noise,
optimizer, ...; ``grokking`` gets op, train_fraction, optimizer, ...), starting from the
experiment's *quick* configuration (its small, real setting). Form values are validated exactly as
``lmech run --quick --set key=value`` validates them (:meth:`lmech.contract.spec.Experiment.make_config`,
raising :class:`~lmech.errors.ConfigError` with one line), before anything is started.

A valid form starts ``python -m lmech.lab.worker`` in a child process (one torch thread,
``OMP_NUM_THREADS=1``) that runs the experiment into the lab's run store under a run id chosen
here, so the page can follow the run before its folder exists. The child's stdout and stderr go to
``ROOT/.lab/<run_id>.log`` (a dot-folder: the store's reindex ignores it); nothing is written
outside the store. At most ``max_active`` playground runs go at a time (CPU is scarce).

Example:
    >>> from lmech.lab.playground import Launcher, validate_form
    >>> overrides, seed = validate_form("grokking", {"steps": "200", "optimizer": "sgd"})  # doctest: +SKIP
    >>> run_id = Launcher("runs").start("grokking", overrides, seed)                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import types
import uuid
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from lmech.contract.spec import config_fields
from lmech.errors import ConfigError

# catalog entries offered by the playground, in menu order (those present in the catalog)
PLAYGROUND_EXPERIMENTS = ("label-noise", "grokking")
# config keys shown in the form, in this order, when the experiment's config has them
FORM_KEYS = ("task", "noise", "op", "train_fraction", "optimizer", "batch_size", "lr", "weight_decay", "width",
             "steps")
MAX_SEED = 2**31 - 1


def playground_experiments() -> list[str]:
    """The playground entries present in the catalog (``label-noise`` first, then ``grokking``)."""
    from lmech import experiments

    return [name for name in PLAYGROUND_EXPERIMENTS if name in experiments.names()]


def _kind(annotation: Any) -> tuple[str, list | None]:
    origin = get_origin(annotation)
    if origin is Literal:
        return "choice", [str(c) for c in get_args(annotation)]
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return ("text", None) if len(args) != 1 else _kind(args[0])
    if annotation is bool:
        return "choice", ["true", "false"]
    if annotation is int:
        return "int", None
    if annotation is float:
        return "float", None
    return "text", None


def form_fields(name: str) -> list[dict]:
    """The form of a playground entry: ``[{key, kind, default, choices}]`` with defaults from the
    experiment's quick configuration. Unknown or non-playground names raise ConfigError."""
    from lmech import experiments

    _require_playground(name)
    exp = experiments.get(name)
    fields = config_fields(exp.config)
    defaults = dataclasses.asdict(exp.make_config(None, quick=True))
    out = []
    for key in FORM_KEYS:
        if key in fields:
            kind, choices = _kind(fields[key])
            default = defaults[key]
            out.append({"key": key, "kind": kind, "choices": choices,
                        "default": str(default).lower() if isinstance(default, bool) else default})
    return out


def _require_playground(name: Any) -> None:
    known = playground_experiments()
    if not isinstance(name, str) or name not in known:
        raise ConfigError(f"unknown playground experiment {name!r}; choose one of {', '.join(known)}")


def validate_form(name: Any, values: Any, seed: Any = 0) -> tuple[dict, int]:
    """Check a submitted form; return ``(overrides, seed)`` with typed values, or raise ConfigError.

    ``values`` maps form keys to strings or numbers; keys outside the form are refused (the
    playground runs the quick configuration plus these keys, nothing else).
    """
    from lmech import experiments

    _require_playground(name)
    if not isinstance(values, dict):
        raise ConfigError("form values must be an object mapping keys to values")
    allowed = [f["key"] for f in form_fields(name)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(map(repr, unknown))} for {name}; "
                          f"the form has {', '.join(allowed)}")
    for key, value in values.items():
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and len(value) > 100):
            raise ConfigError(f"bad value for {key}: give a number or one of the listed choices")
    seed = _seed(seed)
    exp = experiments.get(name)
    cfg = exp.make_config({k: v for k, v in values.items() if not (isinstance(v, str) and v.strip() == "")},
                          quick=True)
    return {k: getattr(cfg, k) for k in values}, seed


def _seed(raw: Any) -> int:
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        seed = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"bad seed {raw!r}: give a whole number from 0 to {MAX_SEED}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"bad seed {seed}: give a whole number from 0 to {MAX_SEED}")
    return seed


class Launcher:
    """Starts playground runs as child processes writing into the run store ``root``."""

    def __init__(self, root: str | Path, max_active: int = 1, python: str | None = None):
        self.root = Path(root)
        self.max_active = max_active
        self.python = python or sys.executable
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def log_path(self, run_id: str) -> Path:
        return self.root / ".lab" / f"{run_id}.log"

    def active(self) -> list[str]:
        """Run ids whose process is still alive (finished children are reaped here)."""
        with self._lock:
            return [rid for rid, proc in self._procs.items() if proc.poll() is None]

    def start(self, experiment: str, overrides: dict, seed: int) -> str:
        """Start a validated run (see :func:`validate_form`) and return its run id.

        Raises :class:`RuntimeError` when ``max_active`` playground runs are already going.
        """
        with self._lock:
            busy = [rid for rid, proc in self._procs.items() if proc.poll() is None]
            if len(busy) >= self.max_active:
                raise RuntimeError(f"{len(busy)} playground run(s) already going ({', '.join(busy)}); "
                                   f"wait for it to finish (at most {self.max_active} at a time)")
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_id = f"{experiment}-lab-{stamp}-{uuid.uuid4().hex[:6]}"
            spec = {"experiment": experiment, "overrides": overrides, "seed": seed, "root": str(self.root),
                    "run_id": run_id}
            log = self.log_path(run_id)
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LMECH_THREADS": "1"}
            with open(log, "wb") as fh:
                self._procs[run_id] = subprocess.Popen(
                    [self.python, "-m", "lmech.lab.worker", json.dumps(spec)], stdout=fh, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env)
            return run_id

    def state(self, run_id: str) -> dict | None:
        """For a run started here whose folder does not exist yet: ``starting`` while its process
        lives, ``failed`` (with the log's last line) once it has exited; ``None`` if not ours."""
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            return {"state": "starting", "message": "the run's process is starting"}
        lines = [ln for ln in self.log_path(run_id).read_text(errors="replace").splitlines() if ln.strip()]
        return {"state": "failed", "message": f"the run's process exited with code {code} before creating the "
                                               f"run: {lines[-1] if lines else 'no output'}"}

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every child started here (tests and shutdown)."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.wait(timeout=timeout)


__all__ = ["FORM_KEYS", "Launcher", "PLAYGROUND_EXPERIMENTS", "form_fields", "playground_experiments",
           "validate_form"]
