"""MNIST-1D, generated locally with the ``mnist1d`` package's procedural generator."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .base import TaskData, preserve_global_rng

__all__ = ["mnist1d"]


@functools.lru_cache(maxsize=8)
def _generate(num_samples: int, seed: int, shuffle_seq: bool) -> tuple[np.ndarray, np.ndarray]:
    """All ``num_samples`` examples (standardized, shuffled) as read-only arrays; cached.

    ``mnist1d.data.make_dataset`` seeds and draws from the *global* ``np.random`` and Python
    ``random`` states (and importing the package may draw from ``random``), so the global
    states are saved before and restored after.
    """
    with preserve_global_rng():
        # the local procedural generator; the package's download path (get_dataset) is never used
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = int(num_samples)
        args.train_split = 1.0  # split here, exactly, rather than by int(N * fraction)
        args.seed = int(seed)
        args.shuffle_seq = bool(shuffle_seq)
        d = make_dataset(args)
    x = np.ascontiguousarray(d["x"], dtype=np.float32)
    y = np.ascontiguousarray(d["y"], dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist1d(n_train: int = 4000, n_test: int = 1000, seed: int = 42, shuffle_seq: bool = False) -> TaskData:
    """MNIST-1D (Greydanus & Kobak 2020, *Scaling down deep learning with MNIST-1D*).

    Ten hand-drawn 12-point 1-D templates (one per digit) are padded, dilated, scaled,
    translated, overlaid with correlated and iid noise, sheared and resampled to length 40.
    Generated procedurally by ``mnist1d.data.make_dataset`` from the installed package (no
    download: its ``get_dataset`` download path is never called). Returns float32 ``x`` of
    shape ``(N, 40)`` and int64 labels in ``0..9``.

    The generator makes ``num_samples = n_train + n_test`` examples, rounded up to a multiple
    of 10 (it draws ``num_samples // 10`` per class; extras are dropped), shuffles them,
    standardizes all of them together to mean 0 and std 1 (the package's convention), and the
    first ``n_train`` are the training set, the next ``n_test`` the test set. With the defaults
    (4000/1000, seed 42) this is the frozen public MNIST-1D data set (same labels, inputs equal
    up to rounding, as measured in shared/research/peer-tools.md). ``shuffle_seq=True`` applies
    the package's fixed random permutation of the 40 positions.

    The generator seeds the global ``np.random`` and ``random``; their states are saved and
    restored, so calling this leaves every global RNG as it was. Generation is a Python loop over
    examples; the arrays are cached in-process (keyed by size, seed and ``shuffle_seq``).

    Example:
        >>> data = mnist1d(n_train=400, n_test=100)
        >>> data.x_train.shape, data.y_test.dtype, data.num_classes
        (torch.Size([400, 40]), torch.int64, 10)
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    total = n_train + n_test
    num_samples = -(-total // 10) * 10
    x, y = _generate(num_samples, int(seed), bool(shuffle_seq))
    info = {
        "source": "mnist1d.data.make_dataset (local procedural generator)",
        "num_samples_generated": int(num_samples),
        "seq_len": int(x.shape[1]),
        "shuffle_seq": bool(shuffle_seq),
        "seed": int(seed),
    }
    return TaskData(
        name="mnist1d",
        x_train=torch.tensor(x[:n_train]),
        y_train=torch.tensor(y[:n_train]),
        x_test=torch.tensor(x[n_train:total]),
        y_test=torch.tensor(y[n_train:total]),
        kind="classification",
        num_classes=10,
        info=info,
    )
