"""A playground run in its own process: ``python -m lmech.lab.worker '<json spec>'``.

The spec (written by :class:`lmech.lab.playground.Launcher`) holds ``experiment``, ``overrides``
(already validated), ``seed``, ``root`` (the run store) and ``run_id``. The run uses one torch
thread and the experiment's quick configuration plus the overrides, like
``lmech run EXPERIMENT --quick --set key=value --threads 1``.

The run goes through the public contract, not through the catalog's code or an executor:
:func:`lmech.runs.runner.run_experiment` looks the name up in the registry, builds and validates
the config and calls the entry's ``run``/``check`` into the store. The worker imports
:mod:`lmech.experiments` only for the table that registers the built-in names (no entry module is
imported until the registry returns the one asked for). So the lab imports no entry, no
executor (sweeps, compare) and not the CLI (tests/test_layers.py checks it).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lmech.lab.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    import torch

    torch.set_num_threads(1)
    import lmech.experiments  # noqa: F401  (registers the built-in names; imports no entry)
    from lmech.runs.runner import run_experiment

    summary = run_experiment(spec["experiment"], spec["overrides"], seed=int(spec["seed"]), out=spec["root"],
                             quick=True, run_id=spec["run_id"])
    print(f"run {summary['id']}: {summary['state']} {summary['message']}".rstrip())
    return 0 if summary["state"] in ("done", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
