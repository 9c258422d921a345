r"""Gradient noise from per-example gradients: signal-to-noise ratios, the exact leave-one-out
noise term, and the gradient noise scale, per coordinate, per layer and globally, with jackknife
standard errors.

On a batch of :math:`b` examples with per-example gradients :math:`g_i = \nabla_w
\ell(f(x_i; w), y_i)` (each a batch of one, :func:`lmech.core.per_example_grads`), per coordinate
:math:`k`:

* mean :math:`\bar g_k = \frac1b\sum_i g_{ik}` (the minibatch gradient for a mean loss);
* per-example variance :math:`\hat\sigma^2_k = \frac1{b-1}\sum_i (g_{ik} - \bar g_k)^2` (unbiased);
* **leave-one-out noise term** :math:`\hat s_k = \hat\sigma_k^2 / b = \Sigma_{B,k}/(b-1)` with
  :math:`\Sigma_{B,k} = \frac1b\sum_i (g_{ik}-\bar g_k)^2`. Exactly, it is the jackknife variance of
  the batch mean, :math:`\frac{b-1}{b}\sum_i(\bar g_{-i,k} - \bar g_k)^2`, and
  :math:`\bar g_k^2 - \hat s_k = \frac1b\sum_i g_{ik}\,\bar g_{-i,k} = \frac{1}{b(b-1)}\sum_{i\ne j}
  g_{ik}g_{jk}` is the unbiased (U-statistic) estimate of the squared true mean
  :math:`\mu_k^2` (``signal``). This is the term the SNR-gated AdamW compares against
  (shared/research/generalization-theory.md §1.6): a coordinate "passes" when
  :math:`\bar g_k^2 > \alpha \hat s_k`;
* **SNR** :math:`\bar g_k^2/\hat s_k` (batch-mean SNR; ``gate_fraction`` is the fraction above
  1, the :math:`\alpha = 1` gate, counted as :math:`\mathrm{SNR}_k > 1 + 10^{-4}`: a coordinate
  that only one example moves, e.g. a ReLU unit active on one example, has
  :math:`\mathrm{SNR}_k = 1` exactly, and without the margin float summation order would decide
  whether it counts) and **GSNR** :math:`\bar g_k^2/\hat\sigma^2_k = \mathrm{SNR}_k/b`
  (per-example, Liu et al., *Understanding Why Neural Networks Generalize Well Through GSNR of
  Parameters*, ICLR 2020; ``mean_gsnr`` averages it over coordinates as Cockpit's MeanGSNR).

Per group of coordinates (a layer, or all): :math:`|\bar g|^2`, :math:`\operatorname{tr}\hat\Sigma =
\sum_k \hat\sigma_k^2`, the group SNR :math:`|\bar g|^2 / (\operatorname{tr}\hat\Sigma / b)`, and
the **gradient noise scale** :math:`B_\text{simple} = \operatorname{tr}\Sigma / |G|^2` (McCandlish
et al., *An Empirical Model of Large-Batch Training*, 2018) with the unbiased
:math:`\widehat{|G|^2} = |\bar g|^2 - \operatorname{tr}\hat\Sigma/b` in the denominator
(``inf`` when that is :math:`\le 0`: noise dominates at this batch size). Group SNR and noise
scale come with **jackknife standard errors**, computed exactly from the leave-one-out sums
:math:`S_1 - g_i` and :math:`Q - |g_i|^2` without recomputing any gradient.

Two ways to the same numbers (``method=``):

* ``"vmap"``, for any model: the per-example gradients (:func:`lmech.core.per_example_grads`),
  :math:`b \times P` numbers, reduced as described below.
* ``"linear"``, when every selected parameter is the weight or bias of an ``nn.Linear`` that the
  forward pass calls once on a ``(b, features)`` input (an MLP, the head of a network): the
  gradient of example :math:`i` is then the outer product :math:`g_i = \delta_i a_i^\top` of the
  layer's input :math:`a_i` and the loss gradient :math:`\delta_i` at its output (bias:
  :math:`\delta_i`), so every statistic comes from one batched forward and backward pass without
  writing :math:`b \times P` numbers (the sums-of-squares trick of BackPACK, Dangel et al.,
  ICLR 2020): :math:`\sum_i g_i = \Delta^\top A`, :math:`\sum_i g_i^{\odot 2} =
  (\Delta^{\odot 2})^\top A^{\odot 2}`, :math:`|g_i|^2 = |a_i|^2|\delta_i|^2`, :math:`g_i\cdot S =
  \delta_i^\top S a_i`, with :math:`\sum_i (g_{ik} - \bar g_k)^2 = \sum_i g_{ik}^2 - b\bar g_k^2`
  in float64. :math:`\sum_i g_i` is autograd's gradient of the batch and the sums of squares one
  matrix product per layer in the model's dtype (as BackPACK's ``Variance``; a float64 product
  takes twice as long on CPU): the cancellation costs a relative error of about
  :math:`\epsilon(1 + \mathrm{GSNR}_k)` in :math:`\hat\sigma_k^2` (:math:`\epsilon` the dtype's
  rounding of a length-:math:`b` sum), negligible where noise matters. Only what is asked is
  computed: ``stderr=False`` skips the per-example norms and dots (one matrix product per layer),
  ``summaries=False`` the group statistics. The
  loss gradients at the output are those of ``loss_fn`` on each example as a batch of one, as in
  the general path: ``vmap`` over the outputs only, or, for the common mean (sum) losses
  (``F.cross_entropy``, ``F.mse_loss``, ... and their modules, without class weights or ignored
  targets), ``b`` (1) times the gradient of the batch loss. Like the general path it assumes the
  model treats examples independently (true in eval mode). A guard compares :math:`\sum_i g_i`
  from the outer products with the autograd gradient of the batch along a random direction: a
  weight also used outside its layer (tied, read directly in ``forward``) or a layer output
  rewritten in place fails it and falls back to ``"vmap"``.
* ``"auto"`` (default): ``"linear"`` when it applies, else ``"vmap"``; :attr:`GradNoise.method`
  says which ran (``benchmarks/gradnoise_paths.py`` times the two, and
  ``benchmarks/gradnoise_vs_backpack.py`` this path against BackPACK; figures in
  docs/results/probes.md).

Several processes (``group=``, :mod:`lmech.core.distributed`): every statistic above is a function
of sufficient statistics that add over examples, so each rank computes them on its shard and
they are combined into those of the global batch (the shards concatenated in rank order): the
column sums :math:`S = \sum_r S_r` by all-reduce; the centered sums of squares about the global
mean, :math:`\sum_r [M_{2,r} + n_r(\bar g_r - \bar g)^2]` (Chan, Golub & LeVeque 1979), by a second
all-reduce; each example's :math:`|g_i|^2` and :math:`g_i\cdot S` (with the global :math:`S`) by
an all-gather of :math:`T \times n_r` numbers. SNR, gate fraction, noise scale and the jackknife
errors are then computed from the same numbers on every rank and equal the single-process values
on the concatenated batch (to float rounding; tested to 1e-8 in float64). The method is agreed
on by all ranks (any rank's fallback to ``"vmap"`` is everyone's).

Memory (``"vmap"``): per-example gradients take :math:`b P` numbers; above ``max_bytes`` the batch is processed
in chunks of examples (two passes: moments first, then each example's dot product with the sum).
Reductions run in the gradients' dtype per chunk, in place on the freshly computed gradients (no
copy of the :math:`b \times P` matrix), and are combined in float64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from lmech.core.functional import (
    DEFAULT_MAX_BYTES,
    FunctionalModel,
    ParamSelector,
    differentiable_kernels,
    per_example_grads,
)
from lmech.errors import MemoryBudgetError
from lmech.core.batch import Output, adapt
from lmech.probes.base import Cost, TrainState, layer_groups, split_batch, subsample
from lmech.probes.precision import full_precision

__all__ = ["GroupNoise", "GradNoise", "grad_noise", "GradNoiseProbe"]

# gate_fraction counts gbar_k^2 > (1 + GATE_MARGIN) * s_k (module docstring: exact ties at SNR 1)
GATE_MARGIN = 1e-4
# method="linear" falls back unless |sum_i g_i - autograd gradient| <= GUARD_RTOL * (b sum_i |g_i|^2)^(1/2),
# a bound on |sum_i g_i|: float rounding passes, a use of a weight outside its layer does not
GUARD_RTOL = 1e-4


@dataclass
class GroupNoise:
    r"""Summary of one group of coordinates (see the module docstring for the formulas).

    Attributes:
        grad_norm_sq: :math:`|\bar g|^2`.
        trace_cov: :math:`\operatorname{tr}\hat\Sigma` (per-example covariance, unbiased).
        signal: :math:`\sum_k (\bar g_k^2 - \hat s_k)`, unbiased estimate of :math:`|\mu|^2`.
        snr: :math:`|\bar g|^2/(\operatorname{tr}\hat\Sigma/b)`; ``snr_stderr`` its jackknife error.
        mean_gsnr: mean over coordinates of :math:`\bar g_k^2/\hat\sigma_k^2` (coordinates with no
            variance are skipped).
        gate_fraction: fraction of coordinates with :math:`\bar g_k^2 > \hat s_k` (by a
            relative margin :data:`GATE_MARGIN`).
        noise_scale: :math:`\operatorname{tr}\hat\Sigma / (|\bar g|^2 - \operatorname{tr}\hat\Sigma/b)`;
            ``noise_scale_stderr`` its jackknife error (``nan`` when a leave-one-out value is inf).
        numel: coordinates in the group.
    """

    grad_norm_sq: float
    trace_cov: float
    signal: float
    snr: float
    snr_stderr: float
    mean_gsnr: float
    gate_fraction: float
    noise_scale: float
    noise_scale_stderr: float
    numel: int


@dataclass
class GradNoise:
    r"""Result of :func:`grad_noise`.

    Attributes:
        mean, variance, loo_variance, snr: dicts ``name -> tensor shaped like the parameter``:
            :math:`\bar g`, :math:`\hat\sigma^2`, :math:`\hat s = \hat\sigma^2/b`, and
            :math:`\bar g^2/\hat s` (``nan`` where :math:`\hat s = 0`); computed on first access
            (the group summaries do not need them).
        groups: ``label -> GroupNoise`` per layer (:func:`lmech.probes.base.layer_groups`, or the
            groups given).
        total: ``GroupNoise`` over all selected coordinates.
        batch_size: :math:`b`.
        method: ``"linear"`` or ``"vmap"``, the path that computed it.
    """

    groups: dict[str, GroupNoise]
    total: GroupNoise
    batch_size: int
    method: str
    flat_sum: Tensor = field(repr=False)  # float64 column sums sum_i g_ik, the selected tensors concatenated
    flat_m2: Tensor = field(repr=False)  # centered sums of squares sum_i (g_ik - gbar_k)^2
    shapes: dict[str, torch.Size] = field(repr=False)

    @cached_property
    def flat_mean(self) -> Tensor:
        return self.flat_sum * (1.0 / self.batch_size)

    def _per_tensor(self, flat: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes.values()]
        return {n: piece.view(s) for (n, s), piece in zip(self.shapes.items(), flat.split(sizes))}

    @cached_property
    def mean(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_mean)

    @cached_property
    def variance(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_m2 * (1.0 / (self.batch_size - 1)))

    @cached_property
    def loo_variance(self) -> dict[str, Tensor]:
        return self._per_tensor(self.flat_m2 * (1.0 / (self.batch_size * (self.batch_size - 1))))

    @cached_property
    def snr(self) -> dict[str, Tensor]:
        # gbar^2 b (b-1) / m2 = S^2 (b-1) / (b m2); nan where m2 = 0 (inf or 0/0 before)
        b = self.batch_size
        ratio = self.flat_sum.square().mul_((b - 1) / b).div_(self.flat_m2)
        return self._per_tensor(ratio.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan))


def _noise_scale(trace_cov: np.ndarray, norm_sq: np.ndarray, b: int) -> np.ndarray:
    denom = norm_sq - trace_cov / b
    return np.where(denom > 0, trace_cov / np.maximum(denom, 1e-300), math.inf)


def _jackknife_se(loo: np.ndarray) -> np.ndarray:
    """Per row of ``loo`` (leave-one-out values, last dim = examples):
    sqrt((b-1)/b * sum_i (theta_{-i} - mean)^2); nan for a row with a non-finite value."""
    b = loo.shape[-1]
    finite = np.isfinite(loo).all(-1)
    x = np.where(finite[..., None], loo, 0.0)
    se = np.sqrt((b - 1) / b * ((x - x.mean(-1, keepdims=True)) ** 2).sum(-1))
    return np.where(finite, se, math.nan)


def _group_summaries(sums: np.ndarray, numel: np.ndarray, sq: np.ndarray | None, dot: np.ndarray | None,
                     members: list[list[int]], b: int) -> list[GroupNoise]:
    r"""Statistics of every group at once, from per-tensor sums (float64 NumPy arrays: a few
    dozen operations on arrays of a few numbers, cheaper in NumPy than in torch).

    ``sums`` is ``(T, 6)``: per tensor :math:`\sum_k \bar g_k^2`, :math:`\sum_k \hat\sigma_k^2`,
    :math:`\sum_k \hat s_k`, :math:`\sum_k \mathrm{GSNR}_k` over coordinates with
    :math:`\hat\sigma_k^2 > 0`, the count of those, and the count of :math:`\bar g_k^2 > \hat s_k`;
    ``numel`` ``(T,)``; ``sq`` and ``dot`` ``(T, b)``: :math:`|g_i|^2` and :math:`S_1\cdot g_i`
    restricted to each tensor (``None``: no standard errors, ``nan``). ``members[j]`` lists the tensors of group ``j``. Every group
    statistic is a sum over its coordinates, so adding the per-tensor sums is exact.
    """

    def add(x: np.ndarray) -> np.ndarray:  # per-group sums of per-tensor rows
        return np.stack([x[ts].sum(0) for ts in members])

    S, n = add(sums), add(numel)
    norm_sq, trace_cov, loo_sum, gsnr_sum, gsnr_count, gate = S.T
    if sq is None:  # no standard errors asked: nan leave-one-out values
        sq = dot = np.full((sums.shape[0], b), math.nan)
    sqg, dotg = add(sq), add(dot)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        snr = np.where(trace_cov > 0, norm_sq / (trace_cov / b), math.inf)
        # leave-one-out (jackknife) values of the group statistics, exactly, from the sums:
        # S1_{-i} = S1 - g_i and Q_{-i} = Q - |g_i|^2 with Q = sum_i |g_i|^2 (b >= 3: bp - 1 >= 1)
        Q = sqg.sum(1, keepdims=True)
        bp = b - 1
        norm_sq_loo = (b * b * norm_sq[:, None] - 2 * dotg + sqg) / bp**2
        trace_cov_loo = ((Q - sqg) - bp * norm_sq_loo) / (bp - 1)
        snr_loo = norm_sq_loo / (trace_cov_loo / bp)
        rows = np.stack([
            norm_sq, trace_cov, norm_sq - loo_sum, snr, _jackknife_se(snr_loo),
            np.where(gsnr_count > 0, gsnr_sum / np.maximum(gsnr_count, 1), math.nan),
            gate / n, _noise_scale(trace_cov, norm_sq, b),
            _jackknife_se(_noise_scale(trace_cov_loo, norm_sq_loo, bp)), n,
        ], 1).tolist()
    return [GroupNoise(*r[:9], numel=int(r[9])) for r in rows]


def _moments(G: Tensor, with_dot: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    r"""Column sums, column centered sums of squares, row squared norms and row dot products
    with the column sums of ``G`` (rows = examples, :math:`m` of them), all in ``G``'s dtype.
    ``G`` is overwritten (centered and squared in place).

    With :math:`s_k = \sum_i g_{ik}` and the rounded column mean :math:`\tilde m_k = s_k/m`:
    ``sq[i]`` :math:`= |g_i|^2`, ``dot[i]`` :math:`= g_i \cdot s` (``None`` unless
    ``with_dot``), and ``m2[k]`` :math:`= \sum_i (g_{ik} - \tilde m_k)^2`, the two-pass
    formula: no cancellation, and the error from rounding the mean, :math:`m(\tilde m_k - \bar
    g_k)^2`, is of relative size :math:`\epsilon^2 \bar g_k^2/\hat\sigma_k^2`. Five
    streaming passes over ``G`` (column sums, row norms, dots, centering, squaring) and one
    more for the column sums of squares; no temporary the size of ``G``. Column sums are
    matrix-vector products with a vector of ones.
    """
    ones = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    s = ones @ G  # a matrix-vector product: about twice as fast on CPU as G.sum(0)
    sq = torch.linalg.vector_norm(G, dim=1).square_()
    dot = torch.inner(G, s) if with_dot else None
    G.sub_(s / G.shape[0])
    G.mul_(G)
    return s, ones @ G, sq, dot


# Losses whose value on a batch is the mean (or sum) of their values on batches of one, so the
# per-example output gradients are b (or 1) times the gradient of the batch loss: one autograd
# call instead of a vmap over the examples (about 1 ms of torch.func overhead on a small batch).
_MEAN_OF_EXAMPLES = (F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                     F.binary_cross_entropy_with_logits)
_LOSS_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss,
                 nn.BCEWithLogitsLoss)


def _batch_scale(loss_fn: Callable, out: Tensor, targets) -> int | None:
    """``b`` (mean reduction) or ``1`` (sum) when ``loss_fn`` is a known loss whose batch value
    on ``out`` is the mean (sum) of its values on each example alone; ``None`` when that is not
    known. Class weights, ``pos_weight``, ignored targets (weighted means, 0/0 on a batch of one)
    and elementwise targets not shaped like the outputs (broadcasting) break it: ``None``."""
    if loss_fn in _MEAN_OF_EXAMPLES:
        reduction = "mean"
        classes = loss_fn in (F.cross_entropy, F.nll_loss)
        ignore = -100 if classes else None
    elif type(loss_fn) in _LOSS_MODULES:
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "pos_weight", None) is not None:
            return None
        reduction = loss_fn.reduction
        classes = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
        ignore = getattr(loss_fn, "ignore_index", None)
    else:
        return None
    if not classes and (not isinstance(targets, Tensor) or targets.shape != out.shape):
        return None  # elementwise losses: targets shaped like the outputs (a broadcast mixes examples)
    if ignore is not None and isinstance(targets, Tensor) and not targets.is_floating_point() \
            and bool((targets == ignore).any()):
        return None
    return {"mean": out.shape[0], "sum": 1}.get(reduction)


def _output_grads(loss_fn: Callable, out: Tensor, targets) -> Tensor:
    r"""Per-example loss gradients at the model output, :math:`e_i = \partial\,
    \texttt{loss\_fn}(o_i^{[1]}, y_i^{[1]}) / \partial o_i` with each example a batch of one:
    ``vmap`` over the examples, or for a known mean/sum loss (:func:`_batch_scale`) ``b`` (1)
    times the gradient of the batch loss, the same numbers (tested)."""
    scale = _batch_scale(loss_fn, out, targets)
    if scale is not None:
        o = out.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(o, targets), o)
        return g.mul_(scale)

    def one(o_i, y_i):
        return loss_fn(o_i.unsqueeze(0), None if y_i is None else y_i.unsqueeze(0))

    return vmap(grad(one), in_dims=(0, None if targets is None else 0))(out, targets)


def _linear_layers(fm: FunctionalModel) -> dict[nn.Linear, dict[str, str]] | None:
    """``{module: {"weight" | "bias": selected name}}`` when every selected parameter is the weight
    or bias of a plain ``nn.Linear`` (its own ``forward``) under one name only (not tied); else
    ``None``."""
    owner = {}
    for module in fm.model.modules():
        if type(module).forward is nn.Linear.forward:
            for attr in ("weight", "bias"):
                param = getattr(module, attr, None)
                if param is not None:
                    owner[id(param)] = (module, attr)
    names_of: dict[int, int] = {}
    for _, param in fm.model.named_parameters(remove_duplicate=False):
        names_of[id(param)] = names_of.get(id(param), 0) + 1
    layers: dict[nn.Linear, dict[str, str]] = {}
    for name in fm.names:
        param = fm.model.get_parameter(name)
        if id(param) not in owner or names_of[id(param)] != 1:
            return None
        module, attr = owner[id(param)]
        layers.setdefault(module, {})[attr] = name
    return layers


class _LinearPass:
    r"""Local sufficient statistics by the outer-product structure of ``nn.Linear`` gradients
    (``method="linear"``, module docstring), on this rank's examples.

    Per layer with inputs :math:`A` (``n x in``) and output loss gradients :math:`\Delta`
    (``n x out``): the weight sums :math:`S = \Delta^\top A` come from the same backward pass
    that gives :math:`\Delta` (autograd's parameter gradients of :math:`\langle f, e\rangle`, in
    the model's dtype); the sums of squares :math:`(\Delta^{\odot2})^\top A^{\odot2}` in the
    model's dtype (one matrix product per layer, as BackPACK's ``Variance``), combined in float64
    as :math:`\sum_i g_{ik}^2 - S_k^2/n`; the cancellation costs a relative error of about
    :math:`\epsilon\,(1 + \mathrm{GSNR}_k)` in :math:`\hat\sigma^2_k` (:math:`\epsilon` the
    dtype's rounding, times the usual growth of a length-:math:`n` sum), far below 1 where the
    noise matters (:math:`\mathrm{GSNR}_k \ll 1/\epsilon`);
    :math:`|g_i|^2 = |a_i|^2|\delta_i|^2` in float64; :math:`g_i\cdot S =
    \sum_j (\Delta S)_{ij} A_{ij}` (:meth:`dots`, only for standard errors). ``ok`` is ``False``
    when the model is not of that form (checked before and during the pass).

    Guard: autograd's :math:`S` includes every use of a weight; the outer-product sum only the
    use in its layer. They are compared along one random direction :math:`u` per weight,
    :math:`|S u - \Delta^\top (A u)| \le \texttt{GUARD\_RTOL}\,(n \sum_i |\delta_i|^2 (a_i\cdot
    u)^2)^{1/2}` (a bound on :math:`|\sum_i \delta_i (a_i\cdot u)|` by Cauchy-Schwarz), which
    fails almost surely for a weight also used outside its layer (tied, read in ``forward``) or
    a layer output rewritten in place, at :math:`O(n(\text{in}+\text{out}))` instead of a second
    matrix product.
    """

    def __init__(self, fm: FunctionalModel, loss_fn: Callable, inputs: tuple, targets, stderr: bool,
                 exact: bool = True):
        self.fm, self.ok = fm, False
        layers = _linear_layers(fm)
        if not layers:
            return
        n = inputs[0].shape[0]
        seen: dict[nn.Linear, list] = {m: [] for m in layers}

        def record(module, args, output):
            seen[module].append((args[0], output))

        hooks = [m.register_forward_hook(record) for m in layers]
        try:
            with torch.enable_grad(), differentiable_kernels():
                out = fm.model(*inputs)
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(out, Tensor) or out.shape[:1] != (n,) or not out.requires_grad:
            return
        calls = {m: c[0] for m, c in seen.items() if len(c) == 1}
        if len(calls) != len(layers) or any(a.dim() != 2 or a.shape[0] != n or o.dim() != 2
                                            for a, o in calls.values()):
            return
        e = _output_grads(loss_fn, out.detach(), targets)
        modules = list(layers)
        params = [fm.model.get_parameter(name) for name in fm.names]
        found = torch.autograd.grad(out, [calls[m][1] for m in modules] + params, grad_outputs=e,
                                    allow_unused=True)
        deltas = dict(zip(modules, found[:len(modules)]))
        batch_grad = dict(zip(fm.names, found[len(modules):]))

        f64, device = torch.float64, out.device
        dt = f64 if exact else out.dtype  # dtype of the per-coordinate statistics
        names = fm.names
        sizes = [fm.shapes[name].numel() for name in names]
        self.sums, self.squares = (torch.empty(fm.numel, dtype=dt, device=device) for _ in range(2))
        views = dict(zip(names, zip(self.sums.split(sizes), self.squares.split(sizes))))
        index = {name: t for t, name in enumerate(names)}
        self.sq = torch.empty(len(names), n, dtype=f64, device=device) if stderr else None
        self._factors = []  # (tensor index, attr, a, d) for the dots
        gen = torch.Generator(device=device).manual_seed(0)
        mismatch = bound = 0.0
        for module, attrs in layers.items():
            a_raw, d_raw = calls[module][0].detach(), deltas[module]  # (n, in), (n, out), model dtype
            a, d = a_raw.to(dt), d_raw.to(dt)
            d2 = d * d
            d2_rows = d2.sum(1).to(f64)
            for attr, name in attrs.items():
                t = index[name]
                sums, squares = views[name]
                g = batch_grad[name]
                if g is None:
                    return
                if attr == "weight":
                    if a_raw.dtype == dt:  # autograd's batch gradient is the sum of the outer products
                        sums.view_as(g).copy_(g)
                    else:  # float64 from float32 factors: exact products
                        torch.mm(d.T, a, out=sums.view_as(g))
                    a2 = a * a
                    torch.mm(d2.T, a2, out=squares.view_as(g))
                    if stderr:
                        self.sq[t] = a2.sum(1).to(f64) * d2_rows
                    u = torch.randn(a.shape[1], generator=gen, dtype=f64, device=device).to(dt)
                    au = a @ u  # (n,)
                    mismatch += float((g.to(dt) @ u - d.T @ au).to(f64).square().sum())
                    bound += float((d2_rows * au.to(f64).square()).sum()) * n
                else:
                    if a_raw.dtype == dt:
                        sums.copy_(g)
                    else:
                        torch.sum(d, 0, out=sums)
                    torch.sum(d2, 0, out=squares)
                    if stderr:
                        self.sq[t] = d2_rows
                    mismatch += float((g.to(dt) - d.sum(0)).to(f64).square().sum())
                    bound += float(d2_rows.sum()) * n
                self._factors.append((t, attr, a_raw, d_raw))
        self.ok = mismatch <= GUARD_RTOL**2 * bound

    def dots(self, S: Tensor) -> Tensor:
        r""":math:`g_i\cdot S` per tensor, ``(T, n)`` float64, for the global column sums ``S``."""
        sizes = [self.fm.shapes[name].numel() for name in self.fm.names]
        parts = S.split(sizes)
        n = self._factors[0][2].shape[0]
        dot = torch.empty(len(sizes), n, dtype=torch.float64, device=S.device)
        for t, attr, a_raw, d_raw in self._factors:
            if attr == "weight":
                St = parts[t].view(d_raw.shape[1], a_raw.shape[1]).to(d_raw.dtype)
                # in the gradients' dtype, as the "vmap" path computes it (no cancellation)
                dot[t] = ((d_raw @ St) * a_raw).sum(1)
            else:
                dot[t] = d_raw.to(torch.float64) @ parts[t].to(torch.float64)
        return dot

    def uncentered(self) -> Tensor:
        """:math:`\\sum_i g_{ik}^2` over this rank's examples (before :meth:`centered`)."""
        return self.squares

    def centered(self) -> Tensor:
        """Centered sums of squares of this rank's examples, :math:`\\sum_i g_{ik}^2 - S_k^2/n`
        (float64; the products are exact); their column means are ``sums / n``."""
        n = self._factors[0][2].shape[0]
        return self.squares.addcmul_(self.sums, self.sums, value=-1.0 / n).clamp_(min=0.0)


class _VmapPass:
    r"""Local sufficient statistics from per-example gradients (``method="vmap"``) on this rank's
    examples, in chunks of at most ``max_bytes``: column sums, per-example squared norms, then
    (:meth:`dots`) each example's dot product with the global column sums, and (:meth:`centered`)
    the centered sums of squares (:func:`_moments`, combined over chunks in float64 by Chan,
    Golub & LeVeque 1979). Unchunked, the gradients are computed once and kept between the
    steps; chunked, :meth:`dots` recomputes them (two passes)."""

    def __init__(self, fm: FunctionalModel, loss_fn: Callable, inputs: tuple, targets,
                 chunk_size: int | None, max_bytes: int | None, stderr: bool):
        self.fm, self.loss_fn, self.inputs, self.targets, self.chunk_size = fm, loss_fn, inputs, targets, chunk_size
        self.ok = True
        n = inputs[0].shape[0]
        item = max(p.element_size() for p in fm.params.values())
        per_example = fm.numel * item
        if max_bytes is None or n * per_example <= max_bytes:
            chunk = max(n, 1)
        else:
            chunk = int(max_bytes // per_example)
            if chunk < 1:
                raise MemoryBudgetError(
                    f"one example's gradient needs {per_example / 2**20:.1f} MiB > budget "
                    f"{max_bytes / 2**20:.1f} MiB; select fewer parameters (params=), or raise the budget")
        self.spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        self.names = fm.names
        self.sizes = [math.prod(fm.shapes[name]) for name in self.names]
        dt = torch.float64
        self._held = None
        self._moments: list[tuple[Tensor, Tensor, int]] = []  # per chunk (mean, m2, m), float64
        sums, sq_parts = None, []
        for a, c in self.spans:
            g = self._grads(a, c)
            rows = [g[name].reshape(c - a, -1) for name in self.names]
            s = torch.cat([torch.ones(c - a, dtype=r.dtype, device=r.device) @ r for r in rows]).to(dt)
            sums = s if sums is None else sums + s
            if stderr:
                sq_parts.append(torch.stack([torch.linalg.vector_norm(r, dim=1).square_() for r in rows]).to(dt))
            if len(self.spans) == 1:
                self._held = rows  # kept for the dots, then centered in place
            else:  # merged as they come: two P-sized float64 vectors, not two per chunk
                moments = [_moments(r, with_dot=False) for r in rows]
                self._moments = _merge(self._moments, torch.cat([mo[0] for mo in moments]).to(dt) / (c - a),
                                       torch.cat([mo[1] for mo in moments]).to(dt), c - a)
            del g, rows
        self.sums = sums
        self.sq = torch.cat(sq_parts, 1) if stderr else None

    def _grads(self, a: int, c: int) -> dict[str, Tensor]:
        xs = tuple(x[a:c] for x in self.inputs)
        ys = None if self.targets is None else self.targets[a:c]
        # (per_example_grads runs attention on kernels that vmap can batch by itself)
        return per_example_grads(self.fm, self.loss_fn, xs, ys, chunk_size=self.chunk_size, max_bytes=None)

    def dots(self, S: Tensor) -> Tensor:
        parts = S.split(self.sizes)
        if self._held is not None:
            return torch.stack([torch.inner(r, p.to(r.dtype)) for r, p in zip(self._held, parts)]).to(torch.float64)
        out = []
        for a, c in self.spans:
            g = self._grads(a, c)
            out.append(torch.stack([torch.inner(g[name].reshape(c - a, -1), p.to(g[name].dtype))
                                    for name, p in zip(self.names, parts)]))
        return torch.cat(out, 1).to(torch.float64)

    def uncentered(self) -> Tensor:
        """:math:`\\sum_i g_{ik}^2` over this rank's examples, float64 (several processes: added
        over ranks before centering about the global mean)."""
        if self._held is not None:
            return torch.cat([torch.linalg.vector_norm(r, dim=0).to(torch.float64).square_() for r in self._held])
        return sum(m2 + m * mean.square() for mean, m2, m in self._moments)

    def centered(self) -> Tensor:
        if self._held is not None:
            moments = [_moments(r, with_dot=False) for r in self._held]
            self._held = None
            m = self.spans[0][1]
            self._moments = [(torch.cat([mo[0] for mo in moments]).to(torch.float64) / m,
                              torch.cat([mo[1] for mo in moments]).to(torch.float64), m)]
        mean = m2 = None
        seen = 0
        for chunk_mean, chunk_m2, m in self._moments:
            if seen == 0:
                mean, m2 = chunk_mean, chunk_m2
            else:
                delta = chunk_mean - mean
                total = seen + m
                mean = mean + delta * (m / total)
                m2 = m2 + chunk_m2 + delta**2 * (seen * m / total)
            seen += m
        return m2


def _merge(moments: list[tuple[Tensor, Tensor, int]], mean: Tensor, m2: Tensor, m: int) -> list:
    """``[(mean, m2, count)]`` of the examples so far and of a new chunk, combined (Chan, Golub &
    LeVeque 1979; the same update as :meth:`_VmapPass.centered`)."""
    if not moments:
        return [(mean, m2, m)]
    (mean0, m20, seen), = moments
    total = seen + m
    delta = mean - mean0
    return [(mean0 + delta * (m / total), m20 + m2 + delta**2 * (seen * m / total), total)]


def _check_batchnorm(model: nn.Module) -> None:
    """Refuse a BatchNorm in training mode with a message (issue 18): its batch statistics mix
    the examples of a batch, so a per-example gradient is not defined (torch raises deep inside
    ``vmap`` otherwise). The sharpness probe measures such a model as it runs (the Hessian of the
    batch loss with batch statistics is defined); the Monitor measures every probe in ``eval()``
    mode, where BatchNorm uses its running statistics and examples are independent."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"grad_noise: {name or type(m).__name__} is a {type(m).__name__} in training mode, whose batch "
                "statistics mix the examples, so per-example gradients are not defined; call model.eval() "
                "first (the Monitor measures in eval mode)")


@full_precision()
def grad_noise(
    model,
    loss_fn: Callable,
    batch,
    params: ParamSelector = None,
    groups: dict[str, list[str]] | None = None,
    *,
    chunk_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    method: str = "auto",
    stderr: bool = True,
    summaries: bool = True,
    precision: str = "float64",
    group=None,
    output: Output = None,
) -> GradNoise:
    r"""Gradient noise statistics of ``loss_fn`` on ``batch`` (module docstring).

    Args:
        model: ``nn.Module`` (run as is: ``eval()`` it for per-example gradients that do not
            depend on the rest of the batch; a BatchNorm in training mode is refused) or
            :class:`lmech.core.FunctionalModel`. A ``DistributedDataParallel`` wrapper is
            unwrapped (its ``.module`` is measured).
        loss_fn: the training loss; each example is evaluated as a batch of one.
        batch: ``(inputs, targets)`` or a dict (``model(**batch)``), :math:`b \ge 3` examples
            along dim 0 over all ranks (forms in :mod:`lmech.core.batch`).
        params: parameter subset.
        groups: ``label -> parameter names`` (default: one group per layer).
        chunk_size: examples per ``vmap`` call inside a chunk (``"vmap"``).
        max_bytes: budget for the per-example gradients held at once (``"vmap"``; ``"linear"``
            holds :math:`O(b \cdot \text{width} + P)` numbers).
        method: ``"auto"``, ``"vmap"`` or ``"linear"`` (module docstring); ``"linear"`` raises
            ``ValueError`` where it does not apply.
        stderr: compute the jackknife standard errors (they need each example's squared norm and
            dot product with the gradient sum: one more matrix product per layer on the
            ``"linear"`` path); ``False`` leaves ``snr_stderr`` and ``noise_scale_stderr`` ``nan``.
        summaries: compute the per-layer and global :class:`GroupNoise`; ``False`` leaves
            ``groups`` empty and ``total`` ``None`` (only the per-coordinate ``mean``,
            ``variance``, ``loo_variance`` and ``snr``, what BackPACK's ``Variance`` gives).
        precision: ``"float64"`` (default): per-coordinate statistics in float64; on the
            ``"linear"`` path the sums and sums of squares are float64 products of the model's
            factors (exact for float32 factors). ``"model"``: on the ``"linear"`` path, in the
            model's dtype, as BackPACK (the sums are autograd's batch gradient; about 1.5x
            faster in float32, docs/results/probes.md), with a relative error of about
            :math:`\epsilon(1+\mathrm{GSNR}_k)` in :math:`\hat\sigma^2_k` from the cancellation in
            :math:`\sum_i g_{ik}^2 - b\bar g_k^2`. The ``"vmap"`` path always combines in float64.
            BackPACK's ``Variance`` statistics alone, at its precision: ``stderr=False,
            summaries=False, precision="model"``; the defaults' extra time is almost all the
            float64 products, the price of their exactness (docs/results/probes.md).
        group: ``None`` (one process), a :class:`lmech.core.distributed.Distributed` context or a
            process group: ``batch`` is this rank's shard, and the statistics are those of the
            global batch, the shards concatenated in rank order (sufficient statistics combined
            by all-reduce, module docstring; every rank returns the same values and must call
            this together).
        output: what ``loss_fn`` sees of the model's output (a field name, an index or a
            callable; :mod:`lmech.core.batch`).

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> gn = grad_noise(net, nn.functional.mse_loss, (x, y))
        >>> list(gn.mean), list(gn.groups)   # root-level parameters: one group each
        (['weight', 'bias'], ['weight', 'bias'])
        >>> gn.total.snr > 0 and gn.total.noise_scale > 0
        True
    """
    from lmech.core.distributed import Distributed, resolve, unwrap

    if not isinstance(model, FunctionalModel):
        model = unwrap(model)  # DDP: measure .module (before output=/dict batches wrap it)
    model, batch = adapt(model, batch, output)  # dict/nested batches, output= (lmech.core.batch)
    inputs, targets = split_batch(batch)
    if isinstance(model, FunctionalModel):
        if params is not None:
            raise ValueError("pass `params` only with an nn.Module; a FunctionalModel has its own")
        fm = model
    else:
        fm = FunctionalModel(unwrap(model), params)
    _check_batchnorm(fm.model)
    if method not in ("auto", "vmap", "linear"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'linear', got {method!r}")
    if precision not in ("float64", "model"):
        raise ValueError(f"precision must be 'float64' or 'model', got {precision!r}")
    if groups is None:
        groups = layer_groups(fm.model, fm.names)
    unknown = [n for names in groups.values() for n in names if n not in fm.shapes]
    if unknown:
        raise ValueError(f"groups name unselected parameters {unknown}; selected: {fm.names}")
    d = group if isinstance(group, Distributed) or group is None else resolve(group)
    n = inputs[0].shape[0]
    counts = d.counts(n) if d is not None else [n]
    b = sum(counts)
    if b < 3:
        raise ValueError(f"grad_noise needs at least 3 examples for leave-one-out estimates, got {b}")
    names = fm.names
    T = len(names)
    sizes = [math.prod(fm.shapes[name]) for name in names]
    dt = torch.float64
    first = next(iter(fm.params.values()))

    # 1. this rank's pass (the same method on every rank: any rank's fallback is everyone's)
    linear_error = ValueError("method='linear' needs every selected parameter to belong to an nn.Linear called "
                              "once on (batch, features) inputs and used nowhere else; use method='vmap'")
    local = None
    if method != "vmap" and n > 0:
        local = _LinearPass(fm, loss_fn, inputs, targets, stderr, exact=precision == "float64")
        if not local.ok:
            local = None
    linear = method != "vmap" and (n == 0 or local is not None)
    if method == "vmap" and d is not None and n > 0:
        local = _VmapPass(fm, loss_fn, inputs, targets, chunk_size, max_bytes, stderr)
    if d is None and not linear:
        if method == "linear":
            raise linear_error
        local = _VmapPass(fm, loss_fn, inputs, targets, chunk_size, max_bytes, stderr)
    P = sum(sizes)

    # 2. sums over the global batch
    if d is None:
        dt = first.dtype if linear and precision == "model" else dt
        S = local.sums
        m2 = local.centered() if not stderr else None
        if stderr:  # (the dots before centering: the vmap path centers its gradients in place)
            dot, sq = local.dots(S), local.sq
            m2 = local.centered()
    else:
        # one all-reduce of (S_r, Q_r = sum_i g_ik^2, fallback flag); m2 = Q - S^2/N in float64
        def packed(pass_, fallback: bool) -> Tensor:
            if pass_ is None:  # no examples here, or a failed linear pass (flag)
                out = torch.zeros(2 * P + 1, dtype=dt, device=first.device)
                out[-1] = float(fallback)
                return out
            return torch.cat([pass_.sums.to(dt), pass_.uncentered().to(dt),
                              torch.tensor([float(fallback)], dtype=dt, device=first.device)])

        total = d.sum(packed(local, method != "vmap" and not linear))
        if method != "vmap" and total[-1] > 0:  # some rank's model is not of the outer-product form
            if method == "linear":
                raise linear_error
            linear = False
            local = _VmapPass(fm, loss_fn, inputs, targets, chunk_size, max_bytes, stderr) if n > 0 else None
            total = d.sum(packed(local, False))
        stat = first.dtype if linear and precision == "model" else dt
        S64, Q64 = total[:P], total[P:2 * P]
        m2 = Q64.addcmul(S64, S64, value=-1.0 / b).clamp_(min=0.0).to(stat)
        S = S64.to(stat)
        dt = stat
        if stderr:
            rows = torch.cat([local.sq, local.dots(S)]) if local is not None else \
                torch.zeros(2 * T, 0, dtype=torch.float64, device=first.device)
            rows = d.gather_rows(rows, counts, dim=1)  # (2T, b): |g_i|^2 and g_i . S
            sq, dot = rows[:T], rows[T:]
    used = "linear" if linear else "vmap"
    if not stderr:
        dot = sq = None
    shapes = {name: fm.shapes[name] for name in names}
    if not summaries:
        return GradNoise(groups={}, total=None, batch_size=b, method=used, flat_sum=S, flat_m2=m2,
                         shapes=shapes)

    # 3. per-tensor sums of the per-coordinate statistics, on views of the flat vectors (P-sized
    # temporaries cost more to allocate than the arithmetic); groups add the per-tensor sums.
    # With r_k = S_k^2 / m2_k = b^2 gbar_k^2 / m2_k: SNR_k = (b-1)/b r_k, GSNR_k = (b-1)/b^2 r_k;
    # r_k is inf where m2_k = 0 < S_k^2 (no variance: gated, no GSNR) and nan for 0/0 (neither).
    gate_r = (1 + GATE_MARGIN) * b / (b - 1)
    dt64 = torch.float64
    rows = []
    with torch.no_grad():
        for sp, m2p in zip(S.split(sizes), m2.split(sizes)):  # (sums accumulated in float64)
            r = (sp * sp).div_(m2p)
            gated = (r > gate_r).sum()
            gsnr = r.nan_to_num_(nan=0.0, posinf=0.0).sum(dtype=dt64) * ((b - 1) / b**2)
            rows.append(torch.stack([(sp * sp).sum(dtype=dt64) / b**2, m2p.sum(dtype=dt64) / (b - 1), gsnr,
                                     (m2p > 0).sum().to(dt64), gated.to(dt64)]))
        per_t = torch.stack(rows).cpu().numpy()
    sums = np.concatenate([per_t[:, :2], per_t[:, 1:2] / b, per_t[:, 2:]], 1)
    index = {name: t for t, name in enumerate(names)}
    labels = list(groups)
    members = [[index[name] for name in groups[label]] for label in labels] + [list(range(T))]
    summaries_ = _group_summaries(sums, np.array(sizes, dtype=np.float64),
                                  None if sq is None else sq.cpu().numpy(),
                                  None if dot is None else dot.cpu().numpy(), members, b)
    return GradNoise(groups=dict(zip(labels, summaries_[:-1])), total=summaries_[-1], batch_size=b, method=used,
                     flat_sum=S, flat_m2=m2, shapes=shapes)


class GradNoiseProbe:
    r"""Monitor probe: :func:`grad_noise` on the probe batch.

    Metrics (global): ``grad_norm``, ``snr``, ``snr_stderr``, ``mean_gsnr``, ``gate_fraction``,
    ``noise_scale``, ``noise_scale_stderr``, ``signal``; per layer (``per_layer=True``):
    ``snr/<layer>``, ``gate_fraction/<layer>``, ``noise_scale/<layer>``; with
    ``per_coordinate=True`` the arrays ``coord_snr/<param>`` (one value per scalar parameter).
    ``num_examples`` uses the first examples of the probe batch only (cost grows with it).
    """

    name = "gradnoise"
    cost: Cost = "medium"
    shards = True  # several processes: combines the ranks' sufficient statistics (grad_noise(group=))

    def __init__(self, *, per_layer: bool = True, per_coordinate: bool = False, num_examples: int | None = None):
        self.per_layer, self.per_coordinate, self.num_examples = per_layer, per_coordinate, num_examples

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        if state.dist is None:
            batch, d = subsample(state.batch, self.num_examples), None
        else:  # the first examples of the global batch
            batch, d = state.dist.first_examples(state.batch, self.num_examples)
            holder = d.sole_holder()
            if holder is not None:  # all on one rank: computed there, the metrics sent to all
                return d.on_rank(holder, lambda: self.measure(dataclasses.replace(state, dist=None)))
        gn = grad_noise(state.model, state.loss_fn, batch, state.params, max_bytes=state.max_bytes, group=d)
        t = gn.total
        out: dict[str, float | Tensor] = {
            "grad_norm": math.sqrt(t.grad_norm_sq), "snr": t.snr, "snr_stderr": t.snr_stderr,
            "mean_gsnr": t.mean_gsnr, "gate_fraction": t.gate_fraction, "noise_scale": t.noise_scale,
            "noise_scale_stderr": t.noise_scale_stderr, "signal": t.signal,
        }
        if self.per_layer:
            for label, g in gn.groups.items():
                out[f"snr/{label}"] = g.snr
                out[f"gate_fraction/{label}"] = g.gate_fraction
                out[f"noise_scale/{label}"] = g.noise_scale
        if self.per_coordinate:
            for name, s in gn.snr.items():
                out[f"coord_snr/{name}"] = s.reshape(-1)
        return out
