r"""Batch sharpness: the curvature of minibatch losses along their own gradients (Andreyev &
Beneventano, *Edge of Stochastic Stability: Revisiting the Edge of Stability for SGD*,
arXiv 2412.20553).

For a minibatch :math:`B` of ``batch_size`` examples drawn without replacement from the data
set, with :math:`L_B(w) = \texttt{loss\_fn}(f(X_B; w), Y_B)` (the training loss on that batch,
e.g. a mean), gradient :math:`g_B = \nabla L_B` and Hessian :math:`H_B = \nabla^2 L_B`:

.. math::
    \mathrm{BS}(w) = \mathbb E_B\Big[\frac{g_B^\top H_B\, g_B}{\lVert g_B\rVert^2}\Big].

This is the paper's definition (the expectation *outside* the Rayleigh quotient; the authors'
reference code, ``calculate_averaged_grad_H_grad`` in ``utils/measure.py``, computes the same by
Monte Carlo over batches drawn without replacement). Their finding: under minibatch SGD with
step :math:`\eta`, BS rises to :math:`2/\eta` and hovers there ("edge of stochastic stability"),
while the full-batch sharpness :math:`\lambda_1(\nabla^2 L)` settles below it, the lower the
smaller the batch. For the full batch (``batch_size = n``) BS is the Rayleigh quotient of
the full Hessian along the full gradient, at most :math:`\lambda_1`.

``ratio_of_means=True`` returns the variant :math:`\mathbb E[g_B^\top H_B g_B] / \mathbb
E[\lVert g_B\rVert^2]` that the paper's code keeps for exploration (``expectation_inside``).

Estimator: the mean over ``num_batches`` random batches (or over the given ``batches``; pass all
:math:`\binom nb` of them for the exact expectation), each needing one gradient and one
Hessian-vector product (forward-over-reverse, :func:`lmech.core.functional.hvp`); the standard
error is the sample standard deviation over :math:`\sqrt{m}` (the delta method for the ratio of
means). Units: those of the Hessian of ``loss_fn`` (with :math:`\frac12` MSE, compare with
:math:`2/\eta`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> x, y = torch.randn(40, 3), torch.randn(40, 1)
    >>> mse = lambda out, t: 0.5 * (out - t).pow(2).mean()
    >>> res = batch_sharpness(net, mse, (x, y), batch_size=8, num_batches=20, seed=0)
    >>> res.num_batches, res.value > 0
    (20, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import math

import torch
from torch import Tensor, nn

from lmech.core.batch import split_batch
from lmech.core.functional import ParamSelector, hvp, loss_and_grad, tree_dot
from lmech.probes.base import Cost, TrainState

__all__ = ["BatchSharpnessResult", "batch_sharpness", "BatchSharpnessProbe"]


@dataclass
class BatchSharpnessResult:
    """``value`` (the estimate), ``stderr``, ``num_batches`` and the per-batch numbers
    ``curvatures`` (:math:`g_B^\\top H_B g_B`) and ``grad_norms_sq`` (:math:`\\lVert g_B\\rVert^2`)."""

    value: float
    stderr: float
    num_batches: int
    curvatures: list[float] = field(repr=False)
    grad_norms_sq: list[float] = field(repr=False)


def _index(batch_inputs: tuple, targets, idx: Tensor):
    xs = tuple(x[idx] for x in batch_inputs)
    ys = targets[idx] if isinstance(targets, Tensor) else targets
    return (xs if len(xs) > 1 else xs[0]), ys


def batch_sharpness(
    model: nn.Module,
    loss_fn: Callable,
    data,
    batch_size: int,
    num_batches: int = 32,
    *,
    batches: Sequence[Tensor] | None = None,
    params: ParamSelector = None,
    ratio_of_means: bool = False,
    seed: int = 0,
) -> BatchSharpnessResult:
    r"""Estimate :math:`\mathbb E_B[g_B^\top H_B g_B / \lVert g_B\rVert^2]` (module docstring).

    ``data`` is ``(inputs, targets)`` over the whole training set (``n`` examples); each batch is
    ``batch_size`` distinct indices drawn uniformly (``torch.randperm`` from a generator seeded
    with ``seed``), or the index tensors in ``batches`` if given. A batch whose gradient is zero
    is skipped (its quotient is undefined). Raises ``ValueError`` for a batch size outside
    ``[1, n]`` or when no batch has a nonzero gradient.
    """
    inputs, targets = split_batch(data)
    n = inputs[0].shape[0]
    if batches is None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an integer in [1, n={n}], got {batch_size!r}")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        gen = torch.Generator().manual_seed(seed)
        count = 1 if batch_size == n else num_batches   # the full batch has one value
        batches = [torch.randperm(n, generator=gen)[:batch_size] for _ in range(count)]
    curv, norms = [], []
    for idx in batches:
        xb, yb = _index(inputs, targets, torch.as_tensor(idx))
        _, g = loss_and_grad(model, loss_fn, xb, yb, params)
        gg = float(tree_dot(g, g))
        if gg == 0.0 or not math.isfinite(gg):
            continue
        hg = hvp(model, loss_fn, xb, yb, g, params)
        curv.append(float(tree_dot(g, hg)))
        norms.append(gg)
    if not curv:
        raise ValueError("every batch had a zero (or non-finite) gradient: batch sharpness is undefined here")
    c, q = torch.tensor(curv, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64)
    m = len(curv)
    if ratio_of_means:
        value = float(c.mean() / q.mean())
        resid = (c - value * q) / q.mean()          # delta method for a ratio of means
    else:
        ratios = c / q
        value = float(ratios.mean())
        resid = ratios - value
    stderr = float(resid.std(unbiased=True) / math.sqrt(m)) if m > 1 else 0.0
    return BatchSharpnessResult(value, stderr, m, curv, norms)


class BatchSharpnessProbe:
    """Monitor probe: ``batch_sharpness`` (and ``batch_sharpness_stderr``) of the probe batch.

    The state's batch plays the data set; ``batch_size`` is the training batch size of the run.

    Example:
        >>> probe = BatchSharpnessProbe(batch_size=32, num_batches=16)
        >>> probe.name, probe.cost
        ('batch_sharpness', 'medium')
    """

    name = "batch_sharpness"
    cost: Cost = "medium"

    def __init__(self, batch_size: int, num_batches: int = 32, *, seed: int = 0):
        self.batch_size, self.num_batches, self.seed = int(batch_size), int(num_batches), int(seed)

    def measure(self, state: TrainState) -> dict[str, float]:
        res = batch_sharpness(state.model, state.loss_fn, state.batch, self.batch_size, self.num_batches,
                              params=state.params, seed=self.seed + int(state.step))
        return {"batch_sharpness": res.value, "batch_sharpness_stderr": res.stderr}
