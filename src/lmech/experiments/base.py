"""Old home of the experiment spec; it now lives on its own floor, :mod:`lmech.contract.spec`
(and :class:`CheckRow` in :mod:`lmech.contract.checks`). Every name keeps working from here."""

from lmech.contract.checks import CheckRow
from lmech.contract.spec import (MAX_SEED, Experiment, available_memory, check_memory_estimate, coerce, coerce_key,
                                 coerce_values, config_fields, describe_config, parse_grid, parse_point, parse_sets,
                                 require, validate_seed)
from lmech.errors import ConfigError

_coerce_known = coerce_key  # the old private name, kept for code written against it (use coerce_key)

__all__ = ["CheckRow", "ConfigError", "Experiment", "MAX_SEED", "available_memory", "check_memory_estimate",
           "coerce", "coerce_key", "coerce_values", "config_fields", "describe_config", "parse_grid",
           "parse_point", "parse_sets", "require", "validate_seed"]
