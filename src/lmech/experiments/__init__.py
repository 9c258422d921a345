"""The experiment catalog.

``lmech.experiments.names()`` lists the entries; ``get(name)`` returns an :class:`Experiment`;
``run_experiment(name, sets, seed, out)`` runs one into the run store, as ``lmech run`` does.
Entries are modules that are imported on first use, so listing the catalog stays cheap.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Callable

from lmech.experiments.base import CheckRow, Experiment, check_memory_estimate, validate_seed
from lmech.errors import ConfigError
from lmech.experiments.progress import RunProgress

# name -> module that defines it (module-level constant EXPERIMENT)
_CATALOG: dict[str, str] = {
    "grokking": "lmech.experiments.grokking",
    "inr-noise": "lmech.experiments.inr_noise",
    "pinn-advection": "lmech.experiments.pinn_advection",
    "edge-of-stability": "lmech.experiments.edge_of_stability",
    "mup": "lmech.experiments.mup",
    "lazy-rich": "lmech.experiments.lazy_rich",
    "coupling": "lmech.experiments.coupling",
    "label-noise": "lmech.experiments.label_noise",
    "double-descent": "lmech.experiments.double_descent",
    "grokking-channel": "lmech.experiments.grokking_channel",
    "deep-linear": "lmech.experiments.deep_linear",
    "saddle-to-saddle": "lmech.experiments.saddle_to_saddle",
    "kernel-curves": "lmech.experiments.kernel_curves",
    "scaling-law": "lmech.experiments.scaling_law",
    "attention-particles": "lmech.experiments.attention_particles",
    "quanta": "lmech.experiments.quanta",
    "prune-reservoir": "lmech.experiments.prune_reservoir",
    "dpo-noisy": "lmech.experiments.dpo_noisy",
    "no-validation": "lmech.experiments.no_validation",
    "stochastic-stability": "lmech.experiments.stochastic_stability",
    "value-clustering": "lmech.experiments.value_clustering",
    "in-context": "lmech.experiments.in_context",
    "task-diversity": "lmech.experiments.task_diversity",
    "central-flows": "lmech.experiments.central_flows",
    "transformer-clusters": "lmech.experiments.transformer_clusters",
}


def names() -> list[str]:
    return list(_CATALOG)


def get(name: str) -> Experiment:
    if name not in _CATALOG:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(_CATALOG)} (see `lmech list`)")
    return importlib.import_module(_CATALOG[name]).EXPERIMENT


def run_experiment(name: str, sets: list[str] | dict[str, Any] | None = None, seed: int = 0,
                   out: str | Path = "runs", quick: bool = False, sweep: str | None = None,
                   run_id: str | None = None,
                   on_start: Callable[[Any, Any], None] | None = None, resume: bool = True,
                   progress: "bool | RunProgress" = False, max_memory: int | None = None) -> dict:
    """Validate the config (nothing is written if it is bad), then run it into the store.

    With ``resume`` (and no ``run_id``/``sweep``), an incomplete run of the same experiment, config
    and seed in the store (its process died) is taken up instead of starting a new one: its folder
    is moved to ``.attempts`` and the run continues under its id from its last checkpoint, for
    entries that checkpoint (the grokking entry), or starts over under that id.

    A configuration whose estimated peak memory (the entry's ``memory``) exceeds ``max_memory``
    bytes (default: the memory available now) is refused with :class:`ConfigError`.

    ``progress``: ``True`` shows the run's progress on the console (a bar on a terminal, a line every
    10 s otherwise; :mod:`lmech.experiments.progress`), or pass a configured ``RunProgress``.

    Returns a summary dict: ``id``, ``path``, ``state``, ``message``, ``result``, ``checks`` and
    ``taken_up`` (``None``, or ``{"id", "step"}``: the incomplete run taken up, ``step`` its last
    checkpoint, ``None`` when it left none and started over).
    """
    from lmech.runs import RunStore

    exp = get(name)
    seed = validate_seed(seed)
    cfg = exp.make_config(sets, quick=quick)
    check_memory_estimate(exp, cfg, max_memory)
    import dataclasses

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


__all__ = ["CheckRow", "ConfigError", "Experiment", "get", "names", "run_experiment"]
