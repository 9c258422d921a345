r"""Several processes (``torch.distributed``): the probe batches of all ranks as one global batch.

Under data parallelism each rank holds a shard of the probe batch, :math:`n_r` examples on rank
:math:`r`, :math:`N = \sum_r n_r`. The *global batch* is the concatenation of the shards in rank
order, and a distributed measurement must return what one process would return on it. Every
quantity lmech measures is built from sums over examples, so each rank computes its part and an
all-reduce adds them:

* a mean-reduced loss: :math:`L = \sum_r \frac{n_r}{N} L_r` (so gradients and Hessian-vector
  products are weighted the same way and all-reduced);
* gradient-noise sufficient statistics: gradient sums, centered sums of squares (combined about
  the global mean, Chan, Golub & LeVeque 1979) and per-example norms and dots (gathered);
* "the first :math:`n` examples" is defined on the global batch (:func:`local_count`).

:class:`Distributed` is that context: the ranks' example counts, sums, broadcasts from rank 0 and
gathers, on a process group of its own with a **collective timeout**, so that a rank that fails
makes the others raise :class:`CollectiveError` instead of waiting forever. Build it with
:func:`resolve` (``group="auto"`` detects an initialized default group with more than one rank).

All ranks must make the same calls in the same order (the Monitor's schedule guarantees it).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmech.core.batch import split_batch, subsample
from lmech.errors import LmechError

__all__ = ["CollectiveError", "Distributed", "resolve", "unwrap", "is_fsdp", "local_count", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(LmechError, RuntimeError):
    """A collective of a distributed measurement failed or timed out (another rank failed or
    stopped); the message names the rank and the cause where it is known."""


def _dist():
    import torch.distributed as dist

    return dist


def unwrap(model):
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else the
    model itself. Probes run on it: second derivatives must not go through DDP's gradient hooks
    (DDP does not support double backward), so products are computed on ``.module`` with
    ``functional_call`` and all-reduced by lmech."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def is_fsdp(model) -> bool:
    """Whether any submodule of ``model`` is sharded by FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass
class Distributed:
    r"""The collectives of one distributed measurement context (module docstring).

    Attributes:
        group: process group for the data collectives (its own, with ``timeout_s``).
        status_group: a gloo group for the per-probe status exchange (CPU tensors; timeout
            ``2 * timeout_s``). Only the Monitor's status exchange uses it.
        rank, world_size: this process's rank in ``group`` and the number of ranks.
        timeout_s: collective timeout in seconds.
        device: where the data group's tensors live (CUDA for NCCL); results come back on the
            input's device.

    Example (two processes, each with its shard ``x_r`` of 16 examples)::

        d = resolve("auto")                       # None when not distributed
        counts = d.counts(x_r.shape[0])           # [16, 16] on every rank
        total = d.sum(x_r.sum(0))                 # the column sums of the global batch
    """

    group: Any
    status_group: Any
    rank: int
    world_size: int
    timeout_s: float
    device: torch.device = torch.device("cpu")  # where the data group's backend wants tensors
    known: list[int] | None = None  # every rank's example count of the batch at hand, when known

    # -- collectives (every rank calls them in the same order) ----------------------------------

    def _guard(self, fn, what: str):
        try:
            return fn()
        except LmechError:
            raise
        except Exception as e:  # gloo timeout, closed connection of a rank that failed
            raise CollectiveError(f"{what} failed on rank {self.rank} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}): another rank failed or "
                                  f"stopped; timeout {self.timeout_s:g} s") from e

    def sum(self, t: Tensor) -> Tensor:
        """The sum over ranks of ``t`` (a new tensor; ``t`` is not modified)."""
        out = t.detach().to(self.device, copy=True).contiguous()
        self._guard(lambda: _dist().all_reduce(out, group=self.group), "all-reduce")
        return out.to(t.device)

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``t`` on every rank (a new tensor, same shape on all ranks)."""
        out = t.detach().to(self.device, copy=True).contiguous()
        self._guard(lambda: _dist().broadcast(out, src=self._global(src), group=self.group), "broadcast")
        return out.to(t.device)

    def counts(self, n: int) -> list[int]:
        """Every rank's ``n`` (e.g. its number of examples), in rank order: the bound counts
        (:meth:`bound`) without communication, else one all-reduce."""
        if self.known is not None:
            if self.known[self.rank] != n:
                raise ValueError(f"rank {self.rank} holds {n} examples but this context was bound to "
                                 f"{self.known[self.rank]}; bind it to the batch at hand (Distributed.bound)")
            return list(self.known)
        local = torch.zeros(self.world_size, dtype=torch.int64)
        local[self.rank] = int(n)
        return [int(c) for c in self.sum(local)]

    def bound(self, counts: list[int]) -> "Distributed":
        """This context with every rank's example count of a batch known (``counts``, the same
        list on every rank), so that probes on that batch skip the all-reduce of the counts."""
        return dataclasses.replace(self, known=[int(c) for c in counts])

    def first_examples(self, batch, n: int | None):
        """``(this rank's part of the first n examples of the global batch, its bound
        context)``; the batch as is when ``n`` is ``None``. Communicates only when the counts
        of ``batch`` are not bound."""
        inputs, _ = split_batch(batch)
        counts = self.counts(inputs[0].shape[0])
        if n is None:
            return batch, self.bound(counts)
        parts = [local_count(c, counts, r, n) for r, c in enumerate(counts)]
        return subsample(batch, parts[self.rank]), self.bound(parts)

    def sole_holder(self) -> int | None:
        """The one rank that holds every example of the bound batch, or ``None`` (several do,
        or the counts are not bound)."""
        if self.known is None:
            return None
        holders = [r for r, c in enumerate(self.known) if c > 0]
        return holders[0] if len(holders) == 1 else None

    def on_rank(self, rank: int, fn):
        """``fn()`` computed on ``rank`` alone and its (picklable) result sent to every rank: when
        one rank holds all the examples a probe uses (the economy preset's "first 32 examples"
        on shards of 128), one small broadcast replaces the all-reduces of parameter-sized
        vectors that the other ranks would only add zeros to."""
        box = [fn() if self.rank == rank else None]
        self._guard(lambda: _dist().broadcast_object_list(box, src=self._global(rank), group=self.group),
                    "broadcast")
        return box[0]

    def gather_rows(self, t: Tensor, counts: list[int], dim: int = 0) -> Tensor:
        """The ranks' ``t`` concatenated along ``dim`` in rank order; rank ``r``'s ``t`` has
        ``counts[r]`` entries along ``dim`` (padded to the largest for the all-gather)."""
        t = t.detach().contiguous()
        most = max(counts)
        if most == 0:
            return t
        shape = list(t.shape)
        shape[dim] = most
        padded = t.new_zeros(shape, device=self.device)
        padded.narrow(dim, 0, t.shape[dim]).copy_(t)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._guard(lambda: _dist().all_gather(parts, padded, group=self.group), "all-gather")
        return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim).to(t.device)

    def gather_batch(self, batch):
        """The global batch ``(inputs, targets)`` from each rank's shard (tensors along dim 0)."""
        inputs, targets = split_batch(batch)
        counts = self.counts(inputs[0].shape[0])
        xs = tuple(self.gather_rows(x, counts) for x in inputs)
        ys = self.gather_rows(targets, counts) if isinstance(targets, Tensor) else targets
        return (xs if len(xs) > 1 else xs[0], ys)

    def sum_status(self, t: Tensor) -> Tensor:
        """The sum over ranks of the CPU tensor ``t``, over the status group."""
        out = t.detach().clone().contiguous()
        self._guard(lambda: _dist().all_reduce(out, group=self.status_group), "status exchange")
        return out

    def gather_messages(self, message: str) -> list[str]:
        out: list = [None] * self.world_size
        self._guard(lambda: _dist().all_gather_object(out, message, group=self.status_group), "status exchange")
        return out

    def _global(self, rank: int) -> int:
        return _dist().get_global_rank(self.group, rank)


def local_count(n_local: int, counts: list[int], rank: int, n: int | None) -> int:
    r"""How many of this rank's first examples belong to the first ``n`` examples of the global
    batch (all ``n_local`` when ``n`` is ``None``): :math:`\min(n_r, \max(0, n - o_r))` with
    :math:`o_r = \sum_{s<r} n_s`."""
    if n is None:
        return n_local
    offset = sum(counts[:rank])
    return max(0, min(n_local, n - offset))


def resolve(group="auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed | None:
    """A :class:`Distributed` context, or ``None`` for one process.

    ``group``: ``"auto"`` (the default process group when one is initialized with more than one
    rank), ``None`` (never distributed), a ``ProcessGroup``, or a :class:`Distributed` (returned
    as is). A context gets process groups of its own (``new_group`` with ``timeout_s``), so every
    rank of ``group`` must call this at the same point (e.g. when building a Monitor)."""
    if group is None or isinstance(group, Distributed):
        return group
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if group == "auto":
            return None
        raise ValueError("group= names a process group but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first, or pass group=None")
    parent = dist.group.WORLD if group == "auto" else group
    if dist.get_world_size(parent) == 1:
        return None
    ranks = dist.get_process_group_ranks(parent)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    backend = dist.get_backend(parent)
    data = dist.new_group(ranks, timeout=timeout, backend=backend)
    # the status exchange has a group of its own: a rank that failed inside a probe posts its
    # status there while the others may still wait in a data collective (no mismatched calls);
    # it waits twice as long, so that a rank whose data collective timed out still finds it there
    status = dist.new_group(ranks, timeout=2 * timeout, backend="gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Distributed(data, status, dist.get_rank(data), dist.get_world_size(data), float(timeout_s), device)
