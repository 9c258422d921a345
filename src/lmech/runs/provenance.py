"""What a run records about where it came from: config hash, library versions, git commit."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

HASH_NEUTRAL: dict[str, Any] = {"probes": "none", "stopping": "none", "stop_patience": 5, "stop_min_step": 0,
                                "stop_min_delta": 0.0, "stop_factor": 1.0}
"""Config keys added after runs were stored, each with the value that means "as before" (e.g. the
catalog's ``probes`` key: ``"none"`` attaches no Monitor, so the run computes what it computed
before the key existed; ``stopping`` at ``"none"`` with its parameters at their defaults,
:data:`lmech.experiments.stopping_keys.NEUTRAL`, attaches no stopping rule). A config whose key holds that value hashes as if the key were absent, so
adding such a key at its default changes no run id (a long sweep resumes by run id); any other value
is hashed as usual. Add a key here only together with such a default."""


def config_hash(experiment: str, config: dict, seed: int) -> str:
    """SHA-256 of the experiment name, the full config (keys sorted) and the seed.

    Two runs with the same hash are the same computation; sweeps use it to skip finished runs. Keys of
    :data:`HASH_NEUTRAL` at their neutral value are left out (the config itself keeps them).

    Example:
        >>> config_hash("x", {"lr": 0.1, "probes": "none"}, 0) == config_hash("x", {"lr": 0.1}, 0)
        True
        >>> config_hash("x", {"lr": 0.1, "probes": "economy"}, 0) == config_hash("x", {"lr": 0.1}, 0)
        False
    """
    config = {k: v for k, v in config.items() if not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])}
    payload = json.dumps({"experiment": experiment, "config": config, "seed": int(seed)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Library versions, Python, platform and the git commit of the lmech source (if any)."""
    import numpy
    import torch

    import lmech

    return {
        "versions": {
            "lmech": lmech.__version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "git_commit": _git_commit(Path(lmech.__file__).resolve().parent),
    }


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return commit + ("-dirty" if dirty else "")
