"""The old path of :func:`run_experiment`, kept for code written against it: the function lives in
:mod:`lmech.runs.runner` (it needs the contract and the run store, nothing of the catalog)."""

from lmech.runs.runner import run_experiment

__all__ = ["run_experiment"]
