r"""Pruning by reservoir membership: remove the weights whose directions the training path never used.

Source: Litman & Guo, *A Theory of Generalization in Deep Learning* (arXiv 2605.01172, 2026),
Sec. 3 (signal channel and reservoir), as reconstructed in ``shared/research/generalization-theory.md``
1.3. The paper defines the reservoir in *output* space, :math:`\ker W_S`; pruning acts on
*parameters*, so we use the parameter-space counterpart of the same construction.

The path Gramian in parameter space
-----------------------------------
A training run makes updates :math:`\Delta w_t` with step sizes :math:`\eta_t`. Write
:math:`d_t = \Delta w_t/\eta_t` for the update direction per unit learning rate (for plain gradient
descent :math:`d_t = -\nabla L_t`; for Adam the preconditioned first moment, :math:`-\Pi_t J_t^\top
E_t g_t` to first order in the notation of :mod:`lmech.probes.gramian`). The **path Gramian** is

.. math:: \Gamma = \sum_t \eta_t\, d_t d_t^\top \;\succeq 0 \quad (P\times P),
          \qquad v^\top\Gamma v = \sum_t \eta_t\,\langle v, d_t\rangle^2 ,

the parameter-space analogue of :math:`\xi^\top W_S \xi = \int \|J^\top P_g\xi\|^2 d\tau`: its range
is the span of the directions training moved along (the channel), its kernel the directions it never
used (the reservoir). Because :math:`\Gamma \succeq 0`, a coordinate axis :math:`e_k` lies in the
reservoir iff :math:`\Gamma_{kk} = e_k^\top\Gamma e_k = 0`, and :math:`\Gamma_{kk} = \sum_t \eta_t
d_{t,k}^2` is how much of the path's work went through weight :math:`k`. Axis-aligned pruning needs
only this diagonal, which accumulates **exactly** in :math:`O(P)` per step; the full :math:`\Gamma`
(:math:`P^2` numbers, 3.4 GB in float64 for 20k weights) is never formed. So the score is exact, not
a proxy, for this Gramian. Two readings, ``mode``:

* ``"update"`` (default): :math:`d_t` = the realized update :math:`(w_t - w_{t-1})/\eta_t`, so
  :math:`\Gamma` uses the optimizer's own metric (Adam's preconditioner, PopRiskAdamW's gate,
  momentum). Decoupled weight decay is part of the realized update; it moves every weight, by
  :math:`\eta\lambda w`, so under weight decay no weight has exactly zero usage, but its share,
  :math:`\eta\lambda^2 w^2` per step, is tiny beside Adam's :math:`O(\eta)` normalized steps.
* ``"gradient"``: :math:`d_t = -\nabla L_t` (the ``.grad`` after ``backward``), i.e. the plain-GD
  metric :math:`\Pi = I`: the accumulated squared-gradient diagonal :math:`\sum_t\eta_t g_{t,k}^2`
  (the cheap proxy that Fisher/SNIP-style saliencies also start from), whatever the optimizer did.

What we do not compute, and why: the parameter-space dual of :math:`W_S` over *all* output-gradient
directions, :math:`\sum_t \eta_t\,\Pi_t J_t^\top J_t\Pi_t`, would need per-example Jacobians at
every step (about :math:`n` times the cost of a training step) and ranks a weight by what *could*
have moved it rather than what did; the realized path is the literal reading of "directions the
training path used".

Pruning
-------
:func:`prune_masks` keeps, per weight tensor (``scope="layer"``, the default: every matrix loses
the same fraction, so no layer is emptied) or over all of them (``scope="global"``), the
:math:`\lfloor (1-s) N \rceil` weights with the highest score and zeroes the rest; ties go to the
lower flat index (a stable order). Only tensors with ``dim >= 2`` (weight matrices, conv kernels,
embeddings) are pruned; biases and norm scales are kept, as in the magnitude-pruning literature
(Han et al. 2015; Frankle & Carbin 2019). Baselines: :func:`magnitude_scores` (:math:`|w|`) and
:func:`random_scores`.

Example:
    >>> import torch
    >>> from lmech.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> net = MLP(4, 2, width=8, depth=1)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    >>> usage = PathUsage(net)
    >>> for _ in range(10):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward(); opt.step()
    ...     usage.step(lr=1e-2)
    >>> masks = prune_masks(usage.scores(), sparsity=0.5)
    >>> apply_masks(net, masks)
    24
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import Tensor, nn

from lmech.errors import ConfigError

__all__ = [
    "PathUsage",
    "path_gramian",
    "prunable_names",
    "magnitude_scores",
    "random_scores",
    "prune_masks",
    "apply_masks",
    "pruned_copy",
    "sparsity_of",
]

Mode = Literal["update", "gradient"]
Scope = Literal["layer", "global"]


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that pruning may zero: every trainable tensor with ``dim >= 2``."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]


def path_gramian(directions: list[Tensor], etas: list[float]) -> Tensor:
    r"""The full path Gramian :math:`\Gamma = \sum_t \eta_t d_t d_t^\top` (float64, ``(P, P)``).

    ``directions``: flat update directions :math:`d_t` ``(P,)``. The brute-force reference for
    :class:`PathUsage` (tests), and for a tiny model the way to look at off-diagonal structure.
    """
    if len(directions) != len(etas) or not directions:
        raise ValueError("path_gramian needs one eta per direction, and at least one")
    D = torch.stack([d.detach().double().reshape(-1) for d in directions])      # (T, P)
    w = torch.as_tensor(etas, dtype=torch.float64)
    return D.T @ (w[:, None] * D)


class PathUsage:
    r"""Accumulates the diagonal of the path Gramian, :math:`\Gamma_{kk} = \sum_t \eta_t d_{t,k}^2`.

    Call :meth:`step` once after every ``optimizer.step()`` with that step's learning rate (with
    ``mode="gradient"`` the ``.grad`` of the step must still be there, i.e. before ``zero_grad``).
    :meth:`scores` returns ``{name: tensor shaped like the parameter}`` (float64) for the
    :func:`prunable_names` (or the ``names`` given). The weights are snapshotted at construction
    (``mode="update"``), so construct it at the start of training, or call :meth:`start`.
    Memory: one float64 score and (``"update"``) one copy of each tracked tensor.

    Example: see the module docstring.
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None, mode: Mode = "update") -> None:
        if mode not in ("update", "gradient"):
            raise ConfigError(f"mode must be 'update' or 'gradient', got {mode!r}")
        by_name = dict(model.named_parameters())
        names = prunable_names(model) if names is None else list(names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown parameter names {unknown}; the model has {list(by_name)[:8]}...")
        if not names:
            raise ConfigError("no parameters to track: the model has no trainable tensor with dim >= 2")
        self.mode = mode
        self.params = {n: by_name[n] for n in names}
        self._score = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()}
        self.steps = 0
        self.start()

    def start(self) -> None:
        """Snapshot the current weights (the left end of the next update)."""
        self._prev = {n: p.detach().clone() for n, p in self.params.items()} if self.mode == "update" else {}

    @torch.no_grad()
    def step(self, lr: float) -> None:
        r"""Add :math:`\eta\,d^2` of the step just taken (:math:`\eta` = ``lr``)."""
        lr = float(lr)
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        for n, p in self.params.items():
            if self.mode == "update":
                d = (p.detach().double() - self._prev[n].double()) / lr
                self._prev[n].copy_(p.detach())
            else:
                if p.grad is None:
                    continue                                   # this step did not reach the tensor
                d = p.grad.detach().double()
            self._score[n].add_(d * d, alpha=lr)
        self.steps += 1

    def scores(self) -> dict[str, Tensor]:
        """:math:`\\Gamma_{kk}` per tracked weight, shaped like each parameter (copies)."""
        return {n: s.clone() for n, s in self._score.items()}


def magnitude_scores(model: nn.Module, names: list[str] | None = None) -> dict[str, Tensor]:
    """:math:`|w|` for the prunable tensors (magnitude pruning's score)."""
    by_name = dict(model.named_parameters())
    return {n: by_name[n].detach().abs().double() for n in (names or prunable_names(model))}


def random_scores(model: nn.Module, seed: int = 0, names: list[str] | None = None) -> dict[str, Tensor]:
    """Uniform random scores (a private generator seeded ``seed``): random pruning, the floor."""
    gen = torch.Generator().manual_seed(int(seed))
    by_name = dict(model.named_parameters())
    return {n: torch.rand(by_name[n].shape, generator=gen, dtype=torch.float64)
            for n in (names or prunable_names(model))}


def _keep_top(flat: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` largest entries; ties to the lower index (stable descending sort)."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask


def prune_masks(scores: dict[str, Tensor], sparsity: float, scope: Scope = "layer") -> dict[str, Tensor]:
    r"""Boolean keep-masks: per tensor (``"layer"``) or over all tensors (``"global"``), keep the
    ``round((1 - sparsity) * N)`` highest scores, :math:`N` the number of entries in the scope."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not scores:
        raise ConfigError("no scores given")
    bad = [n for n, s in scores.items() if not torch.isfinite(s).all()]
    if bad:
        raise ConfigError(f"scores of {bad} are not finite; a diverged run cannot be pruned by them")
    if scope == "layer":
        return {n: _keep_top(s.reshape(-1), round((1 - sparsity) * s.numel())).reshape(s.shape)
                for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    mask = _keep_top(flat, round((1 - sparsity) * flat.numel()))
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = mask[i:i + s.numel()].reshape(s.shape)
        i += s.numel()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> int:
    """Zero the weights where ``masks`` is False, in place; returns how many entries were zeroed."""
    by_name = dict(model.named_parameters())
    zeroed = 0
    for n, m in masks.items():
        if n not in by_name or by_name[n].shape != m.shape:
            raise ConfigError(f"mask {n!r} does not match a parameter of the model")
        by_name[n].mul_(m.to(by_name[n].dtype))
        zeroed += int((~m).sum())
    return zeroed


def pruned_copy(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """A deep copy of ``model`` with ``masks`` applied (the original is untouched)."""
    twin = copy.deepcopy(model)
    apply_masks(twin, masks)
    return twin


def sparsity_of(masks: dict[str, Tensor]) -> float:
    """Fraction of masked-out entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int((~m).sum()) for m in masks.values())) / max(total, 1) if total else math.nan
