"""The contract every floor above the catalog shares, importing nothing but :mod:`lmech.errors`.

* :mod:`lmech.contract.checks` - :class:`CheckRow`, a line of a theory-vs-measurement table;
* :mod:`lmech.contract.spec` - :class:`Experiment` (config dataclass, ``run``, ``check``) and the
  public parsing and typing of ``--set`` / ``--grid`` / ``--point`` values;
* :mod:`lmech.contract.registry` - name -> defining module, with a public :func:`register`.

The catalog entries (:mod:`lmech.experiments`), the executors (sweeps, compare), the report, the
lab and the CLI all import these names from here; nothing here imports torch.
"""

from lmech.contract.checks import CheckRow
from lmech.contract.registry import get, module_of, names, register, unregister
from lmech.contract.spec import (Experiment, coerce, coerce_key, coerce_values, config_fields, describe_config,
                                 parse_grid, parse_point, parse_sets, require, validate_seed)
from lmech.errors import ConfigError, DivergedError, LmechError, MemoryBudgetError

__all__ = ["CheckRow", "ConfigError", "DivergedError", "Experiment", "LmechError", "MemoryBudgetError", "coerce",
           "coerce_key", "coerce_values", "config_fields", "describe_config", "get", "module_of", "names",
           "parse_grid", "parse_point", "parse_sets", "register", "require", "unregister", "validate_seed"]
