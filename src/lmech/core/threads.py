"""NumPy/SciPy BLAS threads held to torch's thread count.

Small LAPACK/BLAS calls on a multi-threaded OpenBLAS are slow and leave spinning threads behind:
scipy's L-BFGS-B on a busy 2-core machine was many times slower per solve, and in the Monitor
the pool that NumPy's eigensolver started kept a second core busy while training went on
(figures in docs/results/probes.md, "BLAS threads" and "Figures that were in docstrings"). :func:`blas_threads` limits
BLAS to ``torch.get_num_threads()`` threads (or ``limit``) for the duration of a ``with`` block,
through ``threadpoolctl``.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["blas_threads"]

_controller = None
_modules_seen = -1


def blas_threads(limit: int | None = None):
    """Context limiting NumPy/SciPy BLAS to ``limit`` threads (default ``torch.get_num_threads()``).

    ``threadpoolctl`` finds the BLAS libraries by scanning the loaded shared objects (the costly
    part); the scan is kept and redone only when modules were imported since (a new import is
    how a new BLAS library, e.g. SciPy's own, gets loaded), so entering the limit is cheap
    enough for every Monitor measurement.

    Example:
        >>> import numpy as np
        >>> with blas_threads(1):
        ...     _ = np.linalg.eigh(np.eye(80))
    """
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
        _modules_seen = len(sys.modules)
    threads = torch.get_num_threads() if limit is None else limit
    return _controller.limit(limits=max(1, int(threads)), user_api="blas")
