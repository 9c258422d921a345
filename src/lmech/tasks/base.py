"""The common container for every task, and small seeding helpers.

Every task function returns a :class:`TaskData`: train and test tensors, the kind of problem,
and a JSON-serializable ``info`` dict with the task's metadata. Task functions are
deterministic given ``seed`` and never read or change the global RNG state of torch, numpy
or Python's ``random``: each one draws from its own ``numpy.random.Generator`` (or
``torch.Generator``) seeded from ``seed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["TaskData", "numpy_rng", "stream_seed", "preserve_global_rng"]


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit integer seed for an independent random stream ``stream`` of a task seeded ``seed``.

    Streams let one part of a task (the teacher, the test set, the training inputs) stay the
    same when another part's size changes: e.g. ``teacher_student(n_train=100, seed=0)`` and
    ``teacher_student(n_train=200, seed=0)`` share their teacher and test set.
    """
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def numpy_rng(seed: int, stream: int = 0) -> np.random.Generator:
    """A private ``numpy.random.Generator`` (PCG64) for ``(seed, stream)``; the global state is untouched."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Save the global RNG states of torch (CPU), numpy and Python's ``random``; restore them on exit.

    For third-party code that seeds or draws from global state (``mnist1d.make_dataset`` calls
    ``np.random.seed``; some imports draw from ``random``).
    """
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _json_check(obj: Any, path: str = "info") -> None:
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _json_check(v, f"{path}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} has a non-string key {k!r}")
            _json_check(v, f"{path}[{k!r}]")
        return
    raise TypeError(
        f"{path} holds a {type(obj).__name__}; TaskData.info may hold only JSON scalars, lists "
        "and dicts"
    )


@dataclass
class TaskData:
    """A supervised data set split into train and test, with metadata.

    Attributes:
        name: task name, e.g. ``"modular_arithmetic"``.
        x_train, y_train, x_test, y_test: tensors with the example index first. Inputs are
            float32 features ``(N, d)`` or, for token tasks, int64 token ids ``(N, T)``.
            Classification targets are int64 class ids ``(N,)``; regression targets are float32
            ``(N, d_out)``.
        kind: ``"classification"`` or ``"regression"``.
        num_classes: number of classes for classification, ``None`` for regression.
        info: task metadata; JSON-serializable scalars, lists and dicts only (checked).
        y_train_clean: the training targets before :func:`~lmech.tasks.add_label_noise`.
        corrupted: bool mask ``(n_train,)`` of the training examples whose target was corrupted.
        groups_train, groups_test: optional int64 subtask id per example (sparse parity).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    kind: str
    num_classes: int | None
    info: dict = field(default_factory=dict)
    y_train_clean: Tensor | None = None
    corrupted: Tensor | None = None
    groups_train: Tensor | None = None
    groups_test: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression', got {self.kind!r}")
        if self.kind == "classification" and self.num_classes is None:
            raise ValueError("a classification task needs num_classes")
        if self.kind == "regression" and self.num_classes is not None:
            raise ValueError("a regression task has num_classes=None")
        if len(self.x_train) != len(self.y_train):
            raise ValueError(
                f"x_train has {len(self.x_train)} examples but y_train has {len(self.y_train)}"
            )
        if len(self.x_test) != len(self.y_test):
            raise ValueError(
                f"x_test has {len(self.x_test)} examples but y_test has {len(self.y_test)}"
            )
        _json_check(self.info)

    # ----------------------------------------------------------------------------- sizes
    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    @property
    def is_tokens(self) -> bool:
        """True when the inputs are integer token ids (use ``info['vocab_size']``, ``info['seq_len']``)."""
        return not torch.is_floating_point(self.x_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, e.g. ``(64,)`` or, for tokens, ``(seq_len,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """Number of input features per example (for token inputs: the sequence length)."""
        return int(math.prod(self.input_shape))

    @property
    def output_dim(self) -> int:
        """Width of the model's output: ``num_classes`` for classification, ``d_out`` for regression."""
        if self.kind == "classification":
            return int(self.num_classes)  # type: ignore[arg-type]
        return int(math.prod(self.y_train.shape[1:])) if self.y_train.dim() > 1 else 1

    # ----------------------------------------------------------------------------- helpers
    def replace(self, **changes: Any) -> "TaskData":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "TaskData":
        """A copy with every tensor moved to ``device``."""
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v.to(device)
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:  # short: tensors are summarized by shape and dtype
        def s(t: Tensor | None) -> str:
            return "None" if t is None else f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"

        extra = ""
        if self.corrupted is not None:
            extra = f", corrupted={int(self.corrupted.sum())}"
        return (
            f"TaskData(name={self.name!r}, kind={self.kind!r}, num_classes={self.num_classes}, "
            f"x_train={s(self.x_train)}, y_train={s(self.y_train)}, x_test={s(self.x_test)}, "
            f"y_test={s(self.y_test)}{extra})"
        )
