"""A playground run in its own process: ``python -m lmech.lab.worker '<json spec>'``.

The spec (written by :class:`lmech.lab.playground.Launcher`) holds ``experiment``, ``overrides``
(already validated), ``seed``, ``root`` (the run store) and ``run_id``. The run uses one torch
thread and the experiment's quick configuration plus the overrides, like
``lmech run EXPERIMENT --quick --set key=value --threads 1``.
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
    from lmech.experiments.runner import run_experiment

    summary = run_experiment(spec["experiment"], spec["overrides"], seed=int(spec["seed"]), out=spec["root"],
                             quick=True, run_id=spec["run_id"])
    print(f"run {summary['id']}: {summary['state']} {summary['message']}".rstrip())
    return 0 if summary["state"] in ("done", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
