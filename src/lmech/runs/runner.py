"""Run one registered experiment into the run store: :func:`run_experiment` (what ``lmech run`` does).

Why it lives in :mod:`lmech.runs` and not in the catalog (issue 15). Running an entry takes three
things: the registry and the spec of the contract (:mod:`lmech.contract`: name -> ``Experiment``,
its config class, the ``--set`` parsing, the memory estimate), the run store (this package), and
the entry's own ``run``/``check``, reached only through the ``Experiment`` that the registry
returns. None of it is catalog code, so the function sits on the run store's floor, below the
catalog: the lab's worker launches a playground run through it without importing an entry or an
executor (sweeps, compare), and the executors (sweeps, compare, verify) and the CLI call the same
function. ``lmech.experiments.run_experiment`` and ``lmech.experiments.runner`` still name it.

Names are looked up in the registry (:mod:`lmech.contract.registry`): the built-in entries are
registered when :mod:`lmech.experiments` (the catalog's table) is imported, a user's with
``register``. A caller that has not imported the catalog imports it first (``import
lmech.experiments``: the table of names, no entry module is loaded).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from lmech.contract.checks import CheckRow
from lmech.contract.registry import get
from lmech.contract.spec import check_memory_estimate, validate_seed
from lmech.errors import ConfigError
from lmech.runs.progress import RunProgress


def run_experiment(name: str, sets: list[str] | dict[str, Any] | Any | None = None, seed: int = 0,
                   out: str | Path = "runs", quick: bool = False, sweep: str | None = None,
                   run_id: str | None = None,
                   on_start: Callable[[Any, Any], None] | None = None, resume: bool = True,
                   progress: "bool | RunProgress" = False, max_memory: int | None = None,
                   config: Any = None) -> dict:
    """Validate the config (nothing is written if it is bad), then run it into the store.

    The config is either ready, ``config=`` (an instance of the entry's config class, e.g. the one a
    sweep planner already built and hashed: it is validated, not parsed again; ``sets`` and
    ``quick`` must then be left out), or built from ``sets`` (``--set`` strings or a dict of
    values) on top of the entry's defaults (its ``quick`` configuration with ``quick``).

    With ``resume`` (and no ``run_id``/``sweep``), an incomplete run of the same experiment, config
    and seed in the store (its process died) is taken up instead of starting a new one: its folder
    is moved to ``.attempts`` and the run continues under its id from its last checkpoint, for
    entries that checkpoint (the grokking entry), or starts over under that id.

    A configuration whose estimated peak memory (the entry's ``memory``) exceeds ``max_memory``
    bytes (default: the memory available now) is refused with :class:`ConfigError`.

    ``progress``: ``True`` shows the run's progress on the console (a bar on a terminal, a line every
    10 s otherwise; :mod:`lmech.runs.progress`), or pass a configured ``RunProgress``.

    Returns a summary dict: ``id``, ``path``, ``state``, ``message``, ``result``, ``checks`` and
    ``taken_up`` (``None``, or ``{"id", "step"}``: the incomplete run taken up, ``step`` its last
    checkpoint, ``None`` when it left none and started over).
    """
    from lmech.runs import RunStore

    exp = get(name)
    seed = validate_seed(seed)
    if config is None:
        cfg = exp.make_config(sets, quick=quick)
    else:
        if not isinstance(config, exp.config):
            raise ConfigError(f"config= must be a {exp.config.__name__} (the config of {name!r}), "
                              f"got {type(config).__name__}")
        if sets or quick:
            raise ConfigError("give either a ready config= or sets/quick to build one, not both")
        cfg = config
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    check_memory_estimate(exp, cfg, max_memory)
    config = dataclasses.asdict(cfg)
    store = RunStore(Path(out))
    taken_up = None
    if resume and run_id is None and sweep is None:
        run_id = store.incomplete_copy(name, config, seed)
        if run_id is not None:
            step = store.checkpoint_step(run_id)
            store.retire(run_id)
            taken_up = {"id": run_id, "step": step}
    run = store.create(name, config, seed, sweep=sweep, run_id=run_id)
    run.taken_up = taken_up
    if on_start is not None:
        on_start(run, cfg)
    reporter = RunProgress() if progress is True else (progress or None)
    if reporter is not None:
        reporter.start(run, cfg, name)
    start = time.perf_counter()
    checks: list[CheckRow] = []
    try:
        with run:
            result = exp.run(cfg, run, seed) or {}
            result["wall_time_s"] = round(time.perf_counter() - start, 3)
            if exp.check is not None:
                checks = exp.check(result)
                result["checks"] = [c.as_dict() for c in checks]
            run.set_result(**result)
    finally:
        if reporter is not None:
            reporter.finish(store.status(run.id)["state"])
    status = store.status(run.id)
    return {"id": run.id, "path": str(run.path), "state": status["state"], "message": status.get("message", ""),
            "result": store.result(run.id), "checks": checks, "taken_up": taken_up}


__all__ = ["run_experiment"]
