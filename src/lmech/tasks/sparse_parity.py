"""Multitask sparse parity: the toy model of the quanta hypothesis of neural scaling."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import TaskData, numpy_rng

__all__ = ["sparse_parity"]

# Independent random streams of one seed (see base.stream_seed).
_SUBSETS, _TRAIN_TASKS, _TRAIN_BITS, _TEST_TASKS, _TEST_BITS = 0, 1, 2, 3, 4


def _draw(
    rng_tasks: np.random.Generator,
    rng_bits: np.random.Generator,
    n: int,
    n_tasks: int,
    n_bits: int,
    subsets: np.ndarray,
    probs: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if probs is None:  # balanced: each task n // n_tasks or one more times, random order
        tasks = rng_tasks.permutation(np.arange(n) % n_tasks)
    else:
        tasks = rng_tasks.choice(n_tasks, size=n, p=probs)
    bits = rng_bits.integers(0, 2, size=(n, n_bits), dtype=np.int64)
    labels = bits[np.arange(n)[:, None], subsets[tasks]].sum(axis=1) % 2
    x = np.zeros((n, n_tasks + n_bits), dtype=np.float32)
    x[np.arange(n), tasks] = 1.0
    x[:, n_tasks:] = bits
    return (
        torch.from_numpy(x),
        torch.from_numpy(labels.astype(np.int64)),
        torch.from_numpy(tasks.astype(np.int64)),
    )


def sparse_parity(
    n_tasks: int = 16,
    n_bits: int = 32,
    k: int = 3,
    n_train: int = 20000,
    n_test: int = 5000,
    zipf_exponent: float = 1.5,
    seed: int = 0,
    test_distribution: str = "uniform",
) -> TaskData:
    """Multitask sparse parity (Michaud, Liu, Girit & Tegmark 2023, *The Quantization Model of
    Neural Scaling*).

    Each input is ``n_tasks`` one-hot "control bits" naming subtask ``i``, followed by
    ``n_bits`` random task bits ``b in {0, 1}`` (float32, shape ``(N, n_tasks + n_bits)``).
    Subtask ``i`` has its own random ``k``-subset ``S_i`` of the task-bit indices (distinct
    across subtasks, sorted; ``info["subsets"]``), and the label is the parity
    ``y = sum_{j in S_i} b_j mod 2`` (binary classification, ``num_classes = 2``).

    Training subtasks are drawn iid with Zipf frequencies ``p_i ∝ (i + 1)^(-zipf_exponent)``,
    ``i = 0..n_tasks-1`` (``info["frequencies"]``). In the quanta model's notation
    ``zipf_exponent = alpha + 1`` (``info["alpha"]``): the default 1.5 is alpha = 0.5.

    The **test set is balanced over subtasks by default** (``test_distribution="uniform"``:
    each subtask appears ``n_test // n_tasks`` or one more times, in random order), so each
    subtask's accuracy is measured on about ``n_test / n_tasks`` examples; the loss under the
    training distribution is the ``frequencies``-weighted mean of the per-subtask losses. Pass
    ``test_distribution="zipf"`` for a test set drawn like the training set.

    ``groups_train`` and ``groups_test`` hold the subtask id of each example. Randomness comes
    from independent streams of ``seed`` (subsets, train tasks, train bits, test tasks, test
    bits): for a fixed seed the subsets and test set do not depend on ``n_train``, and training
    sets are nested in ``n_train``.

    Sizes: defaults give x of width 48, 20000 train and 5000 test examples (about 4 MB).

    Example:
        >>> data = sparse_parity(n_tasks=8, n_bits=20, k=3, n_train=2000, n_test=800)
        >>> data.x_train.shape, data.num_classes, data.groups_test.bincount().tolist()
        (torch.Size([2000, 28]), 2, [100, 100, 100, 100, 100, 100, 100, 100])
    """
    if n_tasks < 1 or n_bits < 1:
        raise ValueError(f"n_tasks and n_bits must be positive, got {n_tasks}, {n_bits}")
    if not 1 <= k <= n_bits:
        raise ValueError(f"k must be in 1..n_bits={n_bits}, got {k}")
    if math.comb(n_bits, k) < n_tasks:
        raise ValueError(
            f"only C({n_bits}, {k}) = {math.comb(n_bits, k)} distinct subsets for {n_tasks} tasks"
        )
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    if test_distribution not in ("uniform", "zipf"):
        raise ValueError(f"test_distribution must be 'uniform' or 'zipf', got {test_distribution!r}")

    rng = numpy_rng(seed, _SUBSETS)
    seen: set[tuple[int, ...]] = set()
    subsets_list: list[list[int]] = []
    while len(subsets_list) < n_tasks:
        s = tuple(sorted(int(j) for j in rng.choice(n_bits, size=k, replace=False)))
        if s not in seen:
            seen.add(s)
            subsets_list.append(list(s))
    subsets = np.asarray(subsets_list, dtype=np.int64)

    ranks = np.arange(1, n_tasks + 1, dtype=np.float64)
    probs = ranks ** (-float(zipf_exponent))
    probs /= probs.sum()

    x_train, y_train, g_train = _draw(
        numpy_rng(seed, _TRAIN_TASKS), numpy_rng(seed, _TRAIN_BITS),
        n_train, n_tasks, n_bits, subsets, probs,
    )
    x_test, y_test, g_test = _draw(
        numpy_rng(seed, _TEST_TASKS), numpy_rng(seed, _TEST_BITS),
        n_test, n_tasks, n_bits, subsets, None if test_distribution == "uniform" else probs,
    )
    info = {
        "n_tasks": int(n_tasks),
        "n_bits": int(n_bits),
        "k": int(k),
        "zipf_exponent": float(zipf_exponent),
        "alpha": float(zipf_exponent) - 1.0,
        "subsets": subsets_list,
        "frequencies": [float(v) for v in probs],
        "test_distribution": test_distribution,
        "layout": "x = [onehot(task) (n_tasks), bits (n_bits)]",
        "seed": int(seed),
    }
    return TaskData(
        name="sparse_parity",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        kind="classification",
        num_classes=2,
        info=info,
        groups_train=g_train,
        groups_test=g_test,
    )
