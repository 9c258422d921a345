"""scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import numpy as np
import torch

from .base import TaskData, numpy_rng, preserve_global_rng

__all__ = ["digits"]


def digits(test_fraction: float = 0.25, seed: int = 0) -> TaskData:
    """The UCI optical-recognition digits as bundled with scikit-learn (``load_digits``).

    1797 images of 8x8 pixels (values 0..16) in 10 classes; the file ships inside
    scikit-learn, so nothing is downloaded. A seeded random permutation (own
    ``numpy.random.Generator``) puts ``round(test_fraction * 1797)`` examples in the test set
    and the rest in the training set (defaults: 1348 train, 449 test). Inputs are standardized
    per pixel with the *training* mean and standard deviation (pixels that are constant on the
    training set are only centred), float32 ``(N, 64)``; labels int64 in ``0..9``.

    Example:
        >>> data = digits()
        >>> data.x_train.shape, data.x_test.shape, data.num_classes
        (torch.Size([1348, 64]), torch.Size([449, 64]), 10)
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    with preserve_global_rng():  # importing sklearn.datasets draws from Python's random
        from sklearn.datasets import load_digits

        bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    n = len(y)
    n_test = int(round(float(test_fraction) * n))
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split")
    perm = numpy_rng(seed, 0).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    info = {
        "source": "sklearn.datasets.load_digits (bundled)",
        "image_shape": [8, 8],
        "test_fraction": float(test_fraction),
        "standardization": "per pixel, train mean/std",
        "seed": int(seed),
    }
    return TaskData(
        name="digits",
        x_train=torch.from_numpy(x[train_idx].astype(np.float32)),
        y_train=torch.from_numpy(y[train_idx]),
        x_test=torch.from_numpy(x[test_idx].astype(np.float32)),
        y_test=torch.from_numpy(y[test_idx]),
        kind="classification",
        num_classes=10,
        info=info,
    )
