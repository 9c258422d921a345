"""Small pieces every training loop in the catalog shares: batching, evaluation, divergence."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from lmech.errors import DivergedError


class Minibatches:
    """Endless index batches: each epoch is a fresh permutation, cut into ``batch_size`` pieces.

    ``batch_size >= n`` gives full-batch training (every step sees all ``n`` examples, in order).
    The ragged tail of each epoch is dropped, so every batch has the same size. The iterator can be
    checkpointed: :meth:`state_dict` holds the generator's state, the current permutation and the
    position in it, and :meth:`load_state_dict` continues the very same sequence.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = int(n), int(batch_size), generator
        self._perm: Tensor | None = None
        self._start = 0

    def __iter__(self) -> "Minibatches":
        return self

    def __next__(self) -> Tensor:
        if self.batch_size >= self.n:
            return torch.arange(self.n)
        if self._perm is None or self._start + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._start = 0
        batch = self._perm[self._start:self._start + self.batch_size]
        self._start += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self._perm, "start": self._start}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._start = state["perm"], int(state["start"])


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Minibatches:
    """Endless index batches (:class:`Minibatches`): a fresh permutation each epoch, equal-size batches."""
    return Minibatches(n, batch_size, generator)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
             chunk: int = 8192) -> dict[str, float]:
    """Mean loss (and accuracy for integer targets) over ``(x, y)``, in eval mode, in chunks."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(x)
    for start in range(0, n, chunk):
        out = model(x[start:start + chunk])
        target = y[start:start + chunk]
        total_loss += float(loss_fn(out, target)) * len(target)
        if not target.is_floating_point():
            correct += int((out.argmax(-1) == target).sum())
    model.train(was_training)
    metrics = {"loss": total_loss / n}
    if not y.is_floating_point():
        metrics["acc"] = correct / n
    return metrics


def check_finite(loss: float, step: int, last_good_step: int) -> None:
    """Raise :class:`DivergedError` (the run is then recorded as diverged) on a NaN/inf loss."""
    if not math.isfinite(loss):
        raise DivergedError(f"loss became {loss} at step {step} (last finite at step {last_good_step}); "
                            "lower the learning rate or check the data", last_good=last_good_step)


def weight_norm(model: nn.Module) -> float:
    """Euclidean norm of all parameters, sqrt(sum_k w_k^2)."""
    with torch.no_grad():
        return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))
