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
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lmech.core.batch import Output, adapt, split_batch
from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, as_functional
from lmech.probes.base import Cost, TrainState, layer_groups, subsample
from lmech.probes.precision import full_precision
# the pieces (re-exported here, their former home): results and summaries, the two passes
from lmech.probes.gradnoise_linear import (  # noqa: F401
    _LOSS_MODULES,
    _MEAN_OF_EXAMPLES,
    GUARD_RTOL,
    _batch_scale,
    _linear_layers,
    _LinearPass,
    _output_grads,
)
from lmech.probes.gradnoise_stats import (  # noqa: F401
    GATE_MARGIN,
    GradNoise,
    GroupNoise,
    _group_summaries,
    _jackknife_se,
    _noise_scale,
    _per_tensor_sums,
)
from lmech.probes.gradnoise_vmap import _moments, _VmapPass  # noqa: F401

__all__ = ["GroupNoise", "GradNoise", "grad_noise", "GradNoiseProbe"]


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
            model's dtype, as BackPACK (the sums are autograd's batch gradient; faster in
            float32, figures in docs/results/probes.md), with a relative error of about
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
    fm = as_functional(model, params)  # (adapt returns no DDP wrapper: unwrapped above)
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

    # 3. per-tensor sums of the per-coordinate statistics; groups add the per-tensor sums
    sums = _per_tensor_sums(S, m2, sizes, b)
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
