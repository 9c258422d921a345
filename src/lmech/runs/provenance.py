"""What a run records about where it came from: config hash, library versions, git commit."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from pathlib import Path


def config_hash(experiment: str, config: dict, seed: int) -> str:
    """SHA-256 of the experiment name, the full config (keys sorted) and the seed.

    Two runs with the same hash are the same computation; sweeps use it to skip finished runs.
    """
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
