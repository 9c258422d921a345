"""What every probe shares: the :class:`Probe` protocol, the :class:`TrainState` it measures, and
the grouping of parameters into layers.

A probe is a small object with a ``name``, a ``cost`` hint and ``measure(state) -> dict``; the
dict maps metric names to floats or tensors (spectra). Per-layer metrics are named
``"<metric>/<layer>"`` (e.g. ``"lambda_max/layers.0"``); the :class:`~lmech.monitor.Monitor`
prefixes every key with the probe's name. Probes never own a training loop and never change the
model, its random stream or the optimizer (the Monitor enforces eval mode and restores RNG
states; probes draw their own random numbers from seeded generators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lmech.core.batch import split_batch, subsample  # re-exported: they live in lmech.core.batch
from lmech.core.functional import (
    DEFAULT_MAX_BYTES,
    FunctionalModel,
    ParamSelector,
    differentiable_kernels,  # re-exported: it lives in lmech.core
)

__all__ = ["Cost", "Probe", "TrainState", "layer_groups", "split_batch", "subsample", "differentiable_kernels"]

Cost = Literal["low", "medium", "high"]
"""Rough cost of one measurement, in units of one gradient on the probe batch:
``low`` (at most a few), ``medium`` (tens, or one per-example-gradient pass), ``high`` (more)."""


@dataclass
class TrainState:
    """What a probe sees at a measurement.

    Attributes:
        model: the module being trained (probes must not change it).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (the training loss, e.g. mean reduced).
        batch: the fixed probe batch ``(inputs, targets)`` in the canonical form of
            :func:`lmech.core.batch.adapt`: ``inputs`` a tensor or a flat tuple of tensors that
            ``model`` takes positionally (the Monitor adapts dict/nested batches and ``output=``
            once, so ``model`` may be a :class:`lmech.core.batch.ModelCall` view of the user's
            module, with the same parameter names and tensors).
        step: the training step of this measurement.
        optimizer: the training optimizer, if given (read only; e.g. Adam's preconditioner).
        params: parameter selector (see :data:`lmech.core.ParamSelector`) for the global metrics.
        max_bytes: memory budget for any one allocation a probe makes.
        cache: shared between the probes of one measurement (e.g. per-example gradients).
        dist: several processes (:class:`lmech.core.distributed.Distributed`): ``batch`` is this
            rank's shard of the global probe batch, for a probe that combines the ranks' parts
            itself (``shards = True`` on the probe class); ``None`` otherwise (the Monitor gives
            every other probe the gathered global batch).
    """

    model: nn.Module
    loss_fn: Callable
    batch: tuple
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    params: ParamSelector = None
    max_bytes: int | None = DEFAULT_MAX_BYTES
    cache: dict[str, Any] = field(default_factory=dict)
    dist: Any = None


@runtime_checkable
class Probe(Protocol):
    """An instrument the Monitor can schedule.

    ``name`` prefixes its metrics; ``cost`` is a :data:`Cost` hint; ``measure(state)`` returns
    ``{metric: float | Tensor}``. Stateful probes (warm starts, a reference kernel taken at the
    first measurement) keep that state on the object.
    """

    name: str
    cost: Cost

    def measure(self, state: TrainState) -> dict[str, float | Tensor]: ...


def layer_groups(model: nn.Module, params: ParamSelector = None) -> dict[str, list[str]]:
    """Selected parameter names grouped by the module that owns them, in model order.

    ``"layers.0.weight"`` and ``"layers.0.bias"`` form the group ``"layers.0"``; a parameter
    registered directly on the root module forms a group of its own name. Tied parameters appear
    once, under their first (canonical) name.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> layer_groups(net)
        {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    names = FunctionalModel(model, params).names
    groups: dict[str, list[str]] = {}
    for n in names:
        owner = n.rpartition(".")[0] or n
        groups.setdefault(owner, []).append(n)
    return groups
