"""Teacher-student regression: a random MLP teacher labels Gaussian inputs.

The classic solvable setting of statistical learning theory (Gardner & Derrida 1989; Seung,
Sompolinsky & Tishby 1992; Saad & Solla 1995): a student network learns a target function
that a fixed, randomly drawn *teacher* network computes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TaskData, numpy_rng

__all__ = ["teacher_student", "make_teacher"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "linear": lambda z: z,
    "identity": lambda z: z,
}

# Independent random streams of one seed (see base.stream_seed).
_TEACHER, _TEST_X, _TRAIN_X, _NOISE = 0, 1, 2, 3


class _Teacher:
    """A fixed MLP ``x -> W_{L+1} phi(W_L ... phi(W_1 x))`` in float64, callable on tensors."""

    def __init__(self, weights: list[Tensor], activation: str) -> None:
        self.weights = weights
        self.activation = activation
        self._phi = _ACTIVATIONS[activation]

    def __call__(self, x: Tensor) -> Tensor:
        h = x.to(torch.float64)
        for w in self.weights[:-1]:
            h = self._phi(h @ w.T)
        return h @ self.weights[-1].T

    def __repr__(self) -> str:
        shapes = [tuple(w.shape) for w in self.weights]
        return f"Teacher(weights={shapes}, activation={self.activation!r})"


def make_teacher(
    d_in: int = 16,
    d_out: int = 1,
    teacher_width: int = 32,
    teacher_depth: int = 1,
    activation: str = "tanh",
    seed: int = 0,
) -> _Teacher:
    """The teacher function that :func:`teacher_student` with the same arguments uses.

    The teacher has ``teacher_depth`` hidden layers of width ``teacher_width`` and activation
    ``activation``; ``teacher_depth=0`` is a linear teacher ``y = W x``. Every weight matrix
    ``W_l`` of shape ``(fan_out, fan_in)`` has iid entries ``N(0, 1/fan_in)`` and there are no
    biases, so with ``x ~ N(0, I)`` every pre-activation has variance about 1 (exactly 1 in the
    first layer) and the targets are O(1). Weights are drawn in float64 from the task's own
    ``numpy.random.Generator`` (stream 0 of ``seed``). Returns a callable mapping a tensor
    ``(N, d_in)`` to float64 ``(N, d_out)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if teacher_depth < 0:
        raise ValueError(f"teacher_depth must be >= 0, got {teacher_depth}")
    if min(d_in, d_out) < 1 or (teacher_depth > 0 and teacher_width < 1):
        raise ValueError("d_in, d_out and teacher_width must be positive")
    rng = numpy_rng(seed, _TEACHER)
    dims = [d_in] + [teacher_width] * teacher_depth + [d_out]
    weights = [
        torch.from_numpy(rng.standard_normal((fo, fi)) / np.sqrt(fi))
        for fi, fo in zip(dims[:-1], dims[1:])
    ]
    return _Teacher(weights, activation)


def teacher_student(
    n_train: int = 256,
    n_test: int = 1024,
    d_in: int = 16,
    d_out: int = 1,
    teacher_width: int = 32,
    teacher_depth: int = 1,
    noise_std: float = 0.0,
    activation: str = "tanh",
    seed: int = 0,
) -> TaskData:
    """Regression on a random MLP teacher with Gaussian inputs.

    Inputs ``x ~ N(0, I_{d_in})`` (float32 ``(N, d_in)``); targets ``y = f*(x)`` (float32
    ``(N, d_out)``) where ``f*`` is the teacher of :func:`make_teacher` (hidden layers with
    weights ``N(0, 1/fan_in)``, no biases, activation ``activation``; ``teacher_depth=0`` gives
    a linear teacher). Label noise ``noise_std * N(0, 1)`` is added to the *training* targets
    only; the test targets are the clean teacher outputs, so the best achievable test MSE is 0
    and the training targets carry noise variance ``noise_std**2`` (``info["noise_std"]``).

    Randomness comes from independent streams of ``seed``: the teacher, the test inputs, the
    training inputs and the noise. Hence, for a fixed seed, the teacher and the test set do not
    depend on ``n_train``, and training sets are nested (``n_train=100`` is the first 100 rows
    of ``n_train=200``), which is what learning-curve sweeps need.

    Example:
        >>> data = teacher_student(n_train=256, d_in=16, noise_std=0.1)
        >>> data.x_train.shape, data.y_train.shape, data.kind
        (torch.Size([256, 16]), torch.Size([256, 1]), 'regression')
        >>> f = make_teacher(d_in=16)        # the same teacher, to evaluate elsewhere
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    teacher = make_teacher(d_in, d_out, teacher_width, teacher_depth, activation, seed)
    x_test = torch.from_numpy(numpy_rng(seed, _TEST_X).standard_normal((n_test, d_in)))
    x_train = torch.from_numpy(numpy_rng(seed, _TRAIN_X).standard_normal((n_train, d_in)))
    y_test = teacher(x_test)
    y_train_clean = teacher(x_train)
    noise = torch.from_numpy(numpy_rng(seed, _NOISE).standard_normal((n_train, d_out)))
    y_train = y_train_clean + float(noise_std) * noise
    info = {
        "d_in": int(d_in),
        "d_out": int(d_out),
        "teacher_width": int(teacher_width),
        "teacher_depth": int(teacher_depth),
        "activation": activation,
        "noise_std": float(noise_std),
        "noise_on": "train targets only",
        "input_distribution": "N(0, I)",
        "teacher_init": "W_l ~ N(0, 1/fan_in), no biases",
        "target_var_test": float(y_test.var()),
        "seed": int(seed),
    }
    return TaskData(
        name="teacher_student",
        x_train=x_train.float(),
        y_train=y_train.float(),
        x_test=x_test.float(),
        y_test=y_test.float(),
        kind="regression",
        num_classes=None,
        info=info,
    )
