"""The experiment spec: what a catalog entry is and how its config is parsed.

An experiment module defines a ``@dataclass`` config whose fields are its keys (types drive the
parsing of ``--set key=value``; ``typing.Literal`` fields list their allowed values), a ``run``
function that trains and logs into a :class:`lmech.runs.Run`, and optionally a ``check`` function
returning :class:`~lmech.contract.checks.CheckRow` rows (theory or target vs measurement). The
module exposes it as ``EXPERIMENT`` and is named in the registry with
:func:`lmech.contract.registry.register`.

Parsing is public and shared by every caller (``lmech run``, sweeps, comparisons, the lab):
:func:`parse_sets` (``--set key=value``), :func:`parse_grid` (``--grid key=v1,v2``),
:func:`parse_point` (``--point key=v,key=v``) turn command-line text into raw values;
:func:`coerce_key` / :func:`coerce_values` type them against an entry's config fields.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Cfg:
    ...     lr: float = 1e-3
    ...     steps: int = 10
    >>> exp = Experiment("toy", "a toy", Cfg, run=lambda cfg, run, seed: {})
    >>> parse_sets(exp, ["lr=0.1", "steps=2e1"])
    {'lr': 0.1, 'steps': 20}
    >>> parse_grid(["lr=1e-3,1e-2"])
    {'lr': ['1e-3', '1e-2']}
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args, get_origin

from lmech.contract.checks import CheckRow
from lmech.errors import ConfigError


MAX_SEED = 2**63 - 1  # the run store's index keeps seeds as SQLite INTEGER (signed 64-bit)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory_estimate(exp: "Experiment", cfg: Any, max_memory: int | None = None) -> None:
    """:class:`ConfigError` when the entry's estimate for ``cfg`` exceeds ``max_memory`` (default: the
    memory available now), before anything is allocated or written."""
    if exp.memory is None:
        return
    need = int(exp.memory(cfg))
    limit = max_memory if max_memory is not None else available_memory()
    if limit is not None and need > limit:
        raise ConfigError(f"this {exp.name} configuration needs about {need / 2**30:.3g} GiB (parameters, optimizer "
                          f"state and activations, estimated from the config) but {limit / 2**30:.3g} GiB "
                          f"{'are allowed (--max-memory)' if max_memory is not None else 'are available'}; "
                          "make the model or batch smaller")


def validate_seed(seed: Any) -> int:
    """``seed`` as an int, or :class:`ConfigError` unless it is an integer in ``[0, 2**63 - 1]``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


@dataclass
class Experiment:
    """A catalog entry."""

    name: str
    summary: str
    config: type
    run: Callable[..., dict]
    check: Callable[[dict], list[CheckRow]] | None = None
    quick: dict[str, Any] = field(default_factory=dict)  # overrides for a small, real configuration
    # bytes a run of this config needs at its peak, estimated without allocating (refused above the limit)
    memory: Callable[[Any], int] | None = None

    def make_config(self, sets: list[str] | dict[str, Any] | None = None, quick: bool = False) -> Any:
        overrides = dict(self.quick) if quick else {}
        if isinstance(sets, dict):
            overrides.update({k: coerce_key(self, k, v) for k, v in sets.items()})
        else:
            overrides.update(parse_sets(self, sets or []))
        cfg = self.config(**overrides)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
        return cfg


def parse_sets(exp: Experiment, sets: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "model=mlp"]`` -> typed values, checked against the config's fields."""
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set lr=1e-3)")
        key, raw = item.split("=", 1)
        out[key.strip()] = coerce_key(exp, key.strip(), raw.strip())
    return out


def config_fields(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _type_text(annotation: Any) -> str:
    """``Literal["a", "b"]`` -> ``a | b``; ``Union[float, Literal["x"]]`` -> ``float | x``; ``int`` -> ``int``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(map(str, get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def describe_config(exp: Experiment) -> list[dict[str, str]]:
    """One row per config key: ``key``, ``type`` (a ``Literal`` lists its values), ``default``, ``quick``
    (its value in the quick configuration, if different) and ``doc`` (the comment on the field's line,
    or the comment lines just above it, in the config class's source)."""
    import inspect
    import re

    source: list[str] = []
    for cls in reversed(exp.config.__mro__):  # base classes first: a subclass's comment wins
        if dataclasses.is_dataclass(cls):
            try:
                source += inspect.getsource(cls).splitlines()
            except (OSError, TypeError):
                pass
    docs, above = {}, []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"^\s+(\w+)\s*:", line)
        if match:
            trailing = line.split("#", 1)[1].strip() if "#" in line else ""
            docs[match.group(1)] = trailing or " ".join(above)
        above = []
    rows = []
    defaults = exp.config()
    for f in dataclasses.fields(exp.config):
        kind = _type_text(config_fields(exp.config)[f.name])
        default = getattr(defaults, f.name)
        quick = exp.quick.get(f.name, default)
        rows.append({"key": f.name, "type": kind, "default": str(default),
                     "quick": "" if quick == default else str(quick), "doc": docs.get(f.name, "")})
    return rows


def coerce_key(exp: Experiment, key: str, raw: Any) -> Any:
    """``raw`` typed as ``exp``'s config key ``key`` (:class:`ConfigError` for an unknown key or a bad value).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Cfg:
        ...     steps: int = 10
        >>> coerce_key(Experiment("toy", "", Cfg, run=print), "steps", "1e3")
        1000
    """
    fields = config_fields(exp.config)
    if key not in fields:
        raise ConfigError(f"unknown key {key!r} for experiment {exp.name!r}; valid keys: {', '.join(fields)}")
    return coerce(key, raw, fields[key])


def coerce(key: str, raw: Any, annotation: Any) -> Any:
    """Convert ``raw`` (usually a string from the command line) to ``annotation``'s type."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if str(choice) == str(raw):
                return choice
        raise ConfigError(f"bad value for {key}: {raw!r} is not one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if type(None) in get_args(annotation) and str(raw).lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in args:
            try:
                return coerce(key, raw, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"bad value for {key}: {raw!r}")
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"bad value for {key}: {raw!r} is not a boolean (true/false)")
    if annotation is int:
        if isinstance(raw, bool):
            raise ConfigError(f"bad value for {key}: {raw!r} is not an integer")
        try:
            value = float(raw) if isinstance(raw, str) and any(c in raw for c in ".eE") else raw
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"bad value for {key}: {raw!r} is not an integer") from None
    if annotation is float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"bad value for {key}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"bad value for {key}: {raw!r} is not a finite number")
        return value
    if annotation is str:
        return str(raw)
    raise ConfigError(f"key {key} has a type ({annotation}) that cannot be set from the command line")


def coerce_values(exp: Experiment, values: dict[str, Any]) -> dict[str, Any]:
    """Every entry of ``values`` typed by :func:`coerce_key` (a dict of overrides, e.g. a sweep point)."""
    return {key: coerce_key(exp, key, value) for key, value in values.items()}


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["lr=1e-3,1e-2", "width=64,128"]`` -> ``{"lr": ["1e-3", "1e-2"], ...}`` (typed later)."""
    grid: dict = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {item!r} is not key=v1,v2,... (e.g. --grid lr=1e-3,1e-2)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid {key}=v1,v2")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def parse_point(item: str) -> dict[str, str]:
    """``"optimizer=poprisk,gate=soft"`` -> ``{"optimizer": "poprisk", "gate": "soft"}`` (typed later)."""
    point: dict = {}
    for pair in (p.strip() for p in item.split(",") if p.strip()):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--point {item!r} is not key=value,key=value (e.g. --point optimizer=poprisk,gate=soft)")
        if key.strip() in point:
            raise ConfigError(f"--point {item!r} sets {key.strip()} twice")
        point[key.strip()] = value.strip()
    if not point:
        raise ConfigError("--point is empty; give key=value,key=value")
    return point


def require(condition: bool, message: str) -> None:
    """Config validation helper: raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


__all__ = ["CheckRow", "ConfigError", "Experiment", "MAX_SEED", "available_memory", "check_memory_estimate",
           "coerce", "coerce_key", "coerce_values", "config_fields", "describe_config", "parse_grid",
           "parse_point", "parse_sets", "require", "validate_seed"]
