"""Planning a sweep: validate every configuration, name the sweep, identify each run by its hash.

A sweep is the product ``grid points x seeds`` of one experiment, on top of fixed ``sets`` (and the
experiment's ``quick`` configuration if asked). Planning touches nothing on disk: every grid point
is turned into a full config by :meth:`lmech.contract.spec.Experiment.make_config` (the same
parsing, coercion and ``validate()`` as ``lmech run``), so a bad key, value or combination is a
:class:`~lmech.errors.ConfigError` before any run starts.

Identity. A run is the computation ``(experiment, full config, seed)``; its id is
``f"{experiment}-{config_hash[:12]}"`` with :func:`lmech.runs.config_hash` (SHA-256 of the
experiment name, the full config dict with sorted keys, and the seed). The same computation
therefore has the same id in every sweep and every invocation, which is what makes resuming exact
and makes duplicates impossible: a run folder is named by its id.

Name. Unless given, a sweep's name is ``<experiment>-<grid keys>-<8 hex>``, the hex being a hash of
the experiment, the typed fixed values, the typed grid (values sorted) and ``quick``. Seeds and
``--random N`` are *not* part of it: running the same command with more seeds or a larger N adds
runs to the same sweep. A sweep's members are listed in its manifest ``ROOT/sweeps/<name>.json``
(the union over every invocation under that name); runs it shares with another sweep are reused,
not run twice.

Points. ``points`` lists explicit configurations (dicts of overrides; e.g. the arms of an
optimizer comparison, which differ in several keys at once); the sweep runs ``points x grid``.
Their keys are grid keys in tables and figures.

Order. Runs execute point by point (every seed of the first grid point, then the next), or with
``order="seeds"`` seed by seed (seed 0 of every point first), so that a sweep stopped part-way has
about as many seeds of every point.

Random search. ``random=N`` runs N distinct grid points instead of the full product: the points in
canonical order (keys sorted, each key's values sorted by their JSON text) are shuffled by
``random.Random(0)`` and the first N taken, so the sample depends only on the grid (not on the
order it was typed in) and a larger N extends a smaller one. N at least the grid size runs all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random as _random
import re
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

from lmech.contract import registry
from lmech.contract.spec import coerce_key, coerce_values, parse_sets, validate_seed
from lmech.errors import ConfigError
from lmech.runs.provenance import config_hash

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RANDOM_SEED = 0
ORDERS = ("points", "seeds")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep, everything a worker needs (picklable; no open files or tensors).

    ``overrides`` holds the typed fixed values and this run's grid values; the worker rebuilds the
    full config from them exactly as the planner did (``make_config(overrides, quick)``).
    ``module`` is the catalog module that defines the experiment, so a worker process can run an
    experiment that was registered at run time in the driver.
    """

    experiment: str
    module: str
    overrides: dict
    quick: bool
    seed: int
    run_id: str
    config_hash: str
    sweep: str
    out: str
    params: dict = field(default_factory=dict)


@dataclass
class SweepPlan:
    """A validated sweep: its name, typed inputs and one :class:`RunSpec` per (grid point, seed)."""

    name: str
    experiment: str
    sets: dict
    grid: dict
    seeds: list[int]
    random: int | None
    quick: bool
    out: Path
    runs: list[RunSpec]
    points: list[dict] = field(default_factory=list)
    order: str = "points"

    @property
    def grid_keys(self) -> list[str]:
        return list(dict.fromkeys([*(k for point in self.points for k in point), *self.grid]))


def run_id_for(experiment: str, chash: str) -> str:
    return f"{experiment}-{chash[:12]}"


def plan_sweep(experiment: str, sets: dict | list[str] | None = None, grid: dict[str, list] | None = None,
               seeds: int | list[int] = 1, random: int | None = None, quick: bool = False,
               out: str | Path = "runs", name: str | None = None, points: list[dict] | None = None,
               order: str = "points") -> SweepPlan:
    """Validate everything and list the runs; raises :class:`ConfigError` with one line if bad."""
    import lmech.experiments  # noqa: F401  (registers the built-in entries)

    exp = registry.get(experiment)
    module = registry.module_of(experiment)
    fixed = _typed_sets(exp, sets)
    typed_grid = _typed_grid(exp, grid, fixed)
    typed_points = _typed_points(exp, points, fixed, typed_grid)
    seed_list = _seed_list(seeds)
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if random is not None and (isinstance(random, bool) or not isinstance(random, Integral) or random < 1):
        raise ConfigError(f"random must be a positive number of grid points to sample, got {random!r}")
    if name is None:
        name = default_name(experiment, fixed, typed_grid, quick, typed_points)
    elif not NAME_PATTERN.match(str(name)):
        raise ConfigError(f"bad sweep name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")

    combos = [{**point, **params} for point in (typed_points or [{}]) for params in _grid_points(typed_grid, random)]
    out = Path(out).resolve()
    specs: list[RunSpec] = []
    for params in combos:
        overrides = {**fixed, **params}
        try:
            cfg = exp.make_config(overrides, quick=quick)
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(f"{err} (grid point {where})" if where else str(err)) from None
        config = dataclasses.asdict(cfg)
        for seed in seed_list:
            chash = config_hash(experiment, config, seed)
            specs.append(RunSpec(experiment, module, overrides, bool(quick), seed, run_id_for(experiment, chash),
                                 chash, name, str(out), params))
    if order == "seeds":
        specs.sort(key=lambda spec: seed_list.index(spec.seed))  # stable: points keep their order per seed
    return SweepPlan(name, experiment, fixed, typed_grid, seed_list, random, bool(quick), out, specs,
                     typed_points, order)


def default_name(experiment: str, fixed: dict, grid: dict, quick: bool, points: list[dict] | None = None) -> str:
    canonical = {"experiment": experiment, "sets": fixed, "quick": bool(quick),
                 "grid": {k: sorted(grid[k], key=_key) for k in grid}}
    if points:
        canonical["points"] = sorted(points, key=_key)
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:8]
    keys = "-".join(sorted({*grid, *(k for point in points or [] for k in point)}))
    keys = re.sub(r"[^A-Za-z0-9._-]", "_", keys)
    return f"{experiment}-{keys}-{digest}" if keys and len(keys) <= 40 else f"{experiment}-{digest}"


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _typed_sets(exp, sets: dict | list[str] | None) -> dict:
    if sets is None:
        return {}
    if isinstance(sets, dict):
        return coerce_values(exp, sets)
    if isinstance(sets, str):
        raise ConfigError(f"sets must be a list of 'key=value' strings or a dict, got the string {sets!r}")
    return parse_sets(exp, list(sets))


def _typed_grid(exp, grid: dict | None, fixed: dict) -> dict:
    typed: dict[str, list] = {}
    for key, values in (grid or {}).items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ConfigError(f"grid {key} must be a list of values (e.g. grid={{'{key}': [1e-3, 1e-2]}}), "
                              f"got {values!r}")
        values = [coerce_key(exp, key, v) for v in values]
        if not values:
            raise ConfigError(f"grid {key} has no values; give at least one (--grid {key}=v1,v2)")
        if key in fixed:
            raise ConfigError(f"{key} is both fixed (--set) and swept (--grid); drop one of them")
        seen = set()
        for v in values:
            if _key(v) in seen:
                raise ConfigError(f"grid {key} lists {v!r} twice; give each value once")
            seen.add(_key(v))
        typed[key] = values
    return typed


def _typed_points(exp, points: list[dict] | None, fixed: dict, grid: dict) -> list[dict]:
    if points is None:
        return []
    if isinstance(points, dict) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("points must be a list of dicts of config values, e.g. [{'optimizer': 'adamw'}, "
                          "{'optimizer': 'poprisk', 'gate': 'soft'}]")
    typed, seen = [], set()
    for point in points:
        point = coerce_values(exp, point)
        both = sorted(set(point) & (set(fixed) | set(grid)))
        if both:
            raise ConfigError(f"{both[0]} is set by a point and also fixed (--set) or swept (--grid); drop one")
        if _key(point) in seen:
            raise ConfigError(f"point {point} is listed twice; give each point once")
        seen.add(_key(point))
        typed.append(point)
    return typed


def _seed_list(seeds: int | list[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, Integral):
        if seeds < 1:
            raise ConfigError(f"seeds must be at least 1 (the number of seeds per config), got {seeds}")
        return list(range(int(seeds)))
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be a count or a list of integers, got {seeds!r}") from None
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be a non-empty list without repeats, got {out}")
    return [validate_seed(s) for s in out]


def _grid_points(grid: dict, random: int | None) -> list[dict]:
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if random is None or random >= len(points):
        return points
    canonical = sorted(range(len(points)), key=lambda i: [_key(points[i][k]) for k in sorted(keys)])
    _random.Random(RANDOM_SEED).shuffle(canonical)
    chosen = set(canonical[:int(random)])
    return [p for i, p in enumerate(points) if i in chosen]  # run them in the order the grid was given
