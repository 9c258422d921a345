"""The catalog's registry: experiment name -> the module that defines it (its ``EXPERIMENT``).

Entries are named by module path, imported on first use, so listing the catalog stays cheap and a
sweep worker (another process) can import an entry that was registered at run time in the driver:
:func:`module_of` gives it the path. The built-in entries are registered by
:mod:`lmech.experiments`; a user's own entry is one call away::

    from lmech.contract.registry import register
    register("my-law", "my_package.my_law")      # my_package/my_law.py defines EXPERIMENT

``register`` refuses to rebind a name to another module unless ``replace=True``;
:func:`unregister` removes a name (tests clean up with it).

Example:
    >>> register("doc-toy", "lmech_doc_toy_module")
    >>> "doc-toy" in names(), module_of("doc-toy")
    (True, 'lmech_doc_toy_module')
    >>> unregister("doc-toy")
"""

from __future__ import annotations

import importlib
import re

from lmech.contract.spec import Experiment
from lmech.errors import ConfigError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# name -> dotted module path whose module-level EXPERIMENT is the entry. Insertion order is the
# catalog order (`lmech list`). Private: use register / unregister / names / get / module_of.
_ENTRIES: dict[str, str] = {}


def register(name: str, module: str, *, replace: bool = False) -> None:
    """Add the entry ``name``, defined by ``module``'s ``EXPERIMENT`` (imported on first :func:`get`).

    Registering the same (name, module) again is a no-op; another module under a taken name is a
    :class:`ConfigError` unless ``replace``.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"bad experiment name {name!r}: use lower-case letters, digits, '-' and '_' (at most 64)")
    if not isinstance(module, str) or not module:
        raise ConfigError(f"register({name!r}, module): module must be a dotted module path, got {module!r}")
    known = _ENTRIES.get(name)
    if known is not None and known != module and not replace:
        raise ConfigError(f"experiment {name!r} is already registered to {known}; pass replace=True to rebind it")
    _ENTRIES[name] = module


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (nothing happens if it is not there)."""
    _ENTRIES.pop(name, None)


def names() -> list[str]:
    """Registered entry names, in catalog order."""
    return list(_ENTRIES)


def module_of(name: str) -> str:
    """The module path that defines ``name`` (:class:`ConfigError` for an unknown name)."""
    if name not in _ENTRIES:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(_ENTRIES)} (see `lmech list`)")
    return _ENTRIES[name]


def get(name: str) -> Experiment:
    """The :class:`~lmech.contract.spec.Experiment` registered as ``name`` (its module is imported now)."""
    experiment = getattr(importlib.import_module(module_of(name)), "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise ConfigError(f"module {_ENTRIES[name]} (experiment {name!r}) defines no EXPERIMENT = Experiment(...)")
    return experiment


__all__ = ["get", "module_of", "names", "register", "unregister"]
