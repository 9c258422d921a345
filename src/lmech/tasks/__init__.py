"""Tasks: data sets made locally, deterministic given a seed.

Every task returns a :class:`TaskData` (train/test tensors, ``kind``, ``num_classes`` and a
JSON-serializable ``info``). Nothing is downloaded; task functions never touch the global RNG
state of torch, numpy or Python's ``random``.

=====================  ==============================================================
``modular_arithmetic``  ``a OP b mod p``, the grokking task (tokens or one-hot)
``teacher_student``     regression on a random MLP teacher with Gaussian inputs
``sparse_parity``       multitask sparse parity with Zipf task frequencies (quanta model)
``mnist1d``             MNIST-1D from the ``mnist1d`` package's procedural generator
``digits``              scikit-learn's bundled 8x8 digits, standardized
=====================  ==============================================================

:func:`add_label_noise` corrupts an exact fraction of any task's training targets.

Example:
    >>> from lmech.tasks import get_task, add_label_noise
    >>> data = get_task("modular_arithmetic", p=97, op="+", train_fraction=0.4)
    >>> noisy = add_label_noise(get_task("digits"), q=0.1)
"""

from __future__ import annotations

from typing import Any, Callable

from .base import TaskData
from .digits import digits
from .label_noise import add_label_noise
from .mnist1d import mnist1d
from .modular import modular_arithmetic
from .sparse_parity import sparse_parity
from .teacher_student import make_teacher, teacher_student

__all__ = [
    "TaskData",
    "TASKS",
    "get_task",
    "modular_arithmetic",
    "teacher_student",
    "make_teacher",
    "add_label_noise",
    "sparse_parity",
    "mnist1d",
    "digits",
]

TASKS: dict[str, Callable[..., TaskData]] = {
    "modular_arithmetic": modular_arithmetic,
    "teacher_student": teacher_student,
    "sparse_parity": sparse_parity,
    "mnist1d": mnist1d,
    "digits": digits,
}


def get_task(name: str, **kwargs: Any) -> TaskData:
    """Build the task registered as ``name`` (see ``TASKS``) with keyword arguments ``kwargs``.

    Hyphens and underscores are interchangeable (``"sparse-parity"`` == ``"sparse_parity"``).
    Raises ValueError listing the valid names for an unknown name.

    Example:
        >>> get_task("sparse-parity", n_tasks=4, n_train=100, n_test=40).n_train
        100
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    return TASKS[key](**kwargs)
