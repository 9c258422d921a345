"""The experiment catalog.

``lmech.experiments.names()`` lists the entries; ``get(name)`` returns an :class:`Experiment`;
``run_experiment(name, sets, seed, out)`` (:mod:`lmech.runs.runner`) runs one into the run
store, as ``lmech run`` does. Entries are modules that are imported on first use, so listing the
catalog stays cheap; they are named in the registry (:mod:`lmech.contract.registry`) here, and a
user adds one with :func:`register`.
"""

from __future__ import annotations

from lmech.contract.checks import CheckRow
from lmech.contract.registry import _ENTRIES, get, module_of, names, register, unregister
from lmech.contract.spec import Experiment
from lmech.errors import ConfigError

for _name, _module in {
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
}.items():
    register(_name, _module)
del _name, _module

# The old private name of the registry table (the same dict object), for code written against it;
# use register() / unregister() / module_of() instead.
_CATALOG = _ENTRIES



def __getattr__(name: str):
    # run_experiment is imported on first use: importing the catalog's table (the lab, `lmech list`)
    # loads no entry and no executor
    if name == "run_experiment":
        from lmech.runs.runner import run_experiment

        return run_experiment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckRow", "ConfigError", "Experiment", "get", "module_of", "names", "register", "run_experiment",
           "unregister"]
