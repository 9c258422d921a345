r"""The loss Hessian :math:`H = \nabla_w^2 L` (or :math:`P^{-1/2} H P^{-1/2}`) as a matrix-free
operator on flat vectors, for any ``nn.Module``: what Lanczos (:mod:`lmech.probes.sharpness`),
Hutch++ / Hutchinson and stochastic Lanczos quadrature (:mod:`lmech.probes.hessian_spectrum`) run
on; and Adam's diagonal preconditioner :math:`P`, read from the optimizer state.

Notation, the normalization of :math:`H` and the definition of :math:`P` with its stability
threshold are in the docstring of :mod:`lmech.probes.sharpness`; how products are computed
(cached graph, chunks, several processes) in :class:`HessianOperator`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import grad
from torch.func import jvp as _func_jvp

from lmech.core.batch import Output, adapt, split_batch
from lmech.core.functional import (
    FunctionalModel,
    ParamSelector,
    as_functional,
    differentiable_kernels,
    flatten,
    loss_and_grad,
    unflatten,
)

__all__ = ["HessianOperator", "adam_preconditioner"]


# --------------------------------------------------------------------------------------------
# Preconditioner
# --------------------------------------------------------------------------------------------


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module, params: ParamSelector = None
) -> tuple[dict[str, Tensor], float]:
    r"""Adam/AdamW's diagonal preconditioner and its stability threshold.

    Returns ``(P, threshold)``: ``P[name]`` (shaped like the parameter) holds
    :math:`(1-\beta_1^t)(\sqrt{v_t/(1-\beta_2^t)}+\epsilon)/\eta` for every selected parameter (see
    the docstring of :mod:`lmech.probes.sharpness`), and ``threshold`` is :math:`(2+2\beta_1)/(1-\beta_1)`. Works for any
    optimizer whose state has ``exp_avg_sq`` and ``step`` and whose groups have ``lr``,
    ``betas`` and ``eps`` (``torch.optim.Adam``, ``AdamW``, ``NAdam`` without its momentum decay is
    *not* covered). Raises ``ValueError`` if a parameter has no state yet (take one step first) or
    if the groups disagree on :math:`\beta_1` (the threshold would be ambiguous).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> net(torch.randn(4, 3)).pow(2).mean().backward(); opt.step()
        >>> P, thr = adam_preconditioner(opt, net)
        >>> sorted(P), round(thr, 6)
        (['bias', 'weight'], 38.0)
    """
    fm = FunctionalModel(model, params)
    by_name = dict(model.named_parameters())
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    P: dict[str, Tensor] = {}
    beta1s = set()
    for name in fm.names:
        p = by_name[name]
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} is not in the optimizer; select the optimized "
                             "parameters with params=")
        for key in ("lr", "betas", "eps"):
            if key not in group:
                raise ValueError(f"optimizer group has no {key!r}: not an Adam-type optimizer "
                                 f"({type(optimizer).__name__}); pass a dict of diagonals instead")
        state = optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
        if v is None or "step" not in state:
            raise ValueError(f"optimizer has no Adam state for {name!r}; take at least one "
                             "optimizer step before measuring preconditioned sharpness")
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        beta1s.add(float(beta1))
        lr = float(group["lr"])
        diag = (1 - beta1**t) * ((v.detach() / (1 - beta2**t)).sqrt() + group["eps"]) / lr
        P[name] = diag.to(p.dtype)
    if len(beta1s) != 1:
        raise ValueError(f"parameter groups use different beta1 {sorted(beta1s)}: measure each "
                         "group separately with params=")
    (beta1,) = beta1s
    return P, (2 + 2 * beta1) / (1 - beta1)


def _resolve_preconditioner(preconditioner, model, fm: FunctionalModel):
    """-> (inverse square root of the diagonal as a flat vector or None, threshold or None)."""
    if preconditioner is None:
        return None, None
    threshold = None
    if isinstance(preconditioner, torch.optim.Optimizer):
        if isinstance(model, FunctionalModel):
            raise ValueError("pass an nn.Module (not a FunctionalModel) with an optimizer preconditioner")
        diag, threshold = adam_preconditioner(preconditioner, model, fm.names)
    elif isinstance(preconditioner, dict):
        missing = [n for n in fm.names if n not in preconditioner]
        if missing:
            raise ValueError(f"preconditioner dict lacks {missing}; give a diagonal for every "
                             f"selected parameter {fm.names}")
        diag = {n: preconditioner[n] for n in fm.names}
        for n, d in diag.items():
            if d.shape != fm.shapes[n]:
                raise ValueError(f"preconditioner[{n!r}] has shape {tuple(d.shape)}, expected "
                                 f"{tuple(fm.shapes[n])}")
    else:
        raise TypeError("preconditioner must be None, a torch optimizer with Adam state, or a dict "
                        f"name -> positive diagonal; got {type(preconditioner).__name__}")
    flat = flatten(diag)
    if not bool((flat > 0).all()) or not bool(torch.isfinite(flat).all()):
        raise ValueError("preconditioner diagonal must be finite and > 0")
    return flat.rsqrt(), threshold


# --------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------


class HessianOperator:
    r"""The loss Hessian (optionally preconditioned) as a matvec on flat vectors.

    .. math::
        v \mapsto D\,H\,D\,v,\qquad D = P^{-1/2}\ (\text{identity without a preconditioner}),

    with :math:`H = \nabla^2_w L(w)` over the selected parameters, in the flat order of
    :attr:`names` (:func:`lmech.core.flatten`).

    How products are computed (costs: ``benchmarks/hvp_cost.py``, figures in
    ``docs/results/probes.md``):

    * whole batch (default): reverse-over-reverse on a cached graph. The gradient
      :math:`g(w) = \nabla L` is computed once with ``create_graph=True`` when the operator is
      built; each product is one backward pass through that graph,
      :math:`Hv = \nabla_w \langle g(w), v\rangle` (Pearlmutter 1994). Cheaper than
      forward-over-reverse (:func:`lmech.core.hvp`), which recomputes the forward pass each time. The graph (activations of the batch) stays
      in memory while the operator lives. The parameters are read, never written; if they are
      changed in place while the operator is alive, autograd raises instead of returning stale
      products.
    * attention (``scaled_dot_product_attention``) runs on its math backend here
      (:func:`lmech.probes.base.differentiable_kernels`): the fused kernels have no second
      derivative.
    * ``batch_size`` set: the batch is processed in chunks with forward-over-reverse
      (``jvp(grad(L_c))``), no graph kept, activation memory of one chunk, and
      :math:`H v = \sum_c \frac{n_c}{n} H_c v`, which equals the full-batch product when
      ``loss_fn`` is a mean over examples (the usual case; don't chunk a ``sum`` loss).
    * several processes (``group=``, :mod:`lmech.core.distributed`): ``batch`` is this rank's
      shard of :math:`n_r` examples and the operator is the Hessian of the global mean loss
      :math:`L = \sum_r \frac{n_r}{N} L_r` (``loss_fn`` a mean over examples): each rank computes
      its weighted product on its own module (a ``DistributedDataParallel`` wrapper is unwrapped:
      DDP's gradient hooks do not support double backward, so products go through ``.module``
      with ``functional_call``) and an all-reduce adds them, so every rank holds the same
      product, and Lanczos, Hutchinson and SLQ, started from the same vectors, run identically
      on every rank. All ranks must build the operator and call :meth:`matvec` together.

    Attributes:
        dim: number of selected scalars.
        names: selected parameter names (flat order).
        dtype, device: of the parameters.
        threshold: the adaptive stability threshold when the preconditioner is an Adam optimizer.
        num_matvecs: products computed so far.

    Example:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> x = torch.randn(10, 3); y = torch.randn(10, 1)
        >>> op = HessianOperator(net, lambda o, t: 0.5 * ((o - t) ** 2).mean(), (x, y))
        >>> torch.allclose(op.matvec(torch.ones(3)), x.T @ x @ torch.ones(3) / 10, atol=1e-5)
        True
    """

    def __init__(
        self,
        model,
        loss_fn: Callable,
        batch,
        params: ParamSelector = None,
        preconditioner=None,
        batch_size: int | None = None,
        group=None,
        *,
        output: Output = None,
    ):
        from lmech.core.distributed import Distributed, resolve, unwrap

        if not isinstance(model, FunctionalModel):
            model = unwrap(model)  # DDP: measure .module (before output=/dict batches wrap it)
        model, batch = adapt(model, batch, output)
        inputs, targets = split_batch(batch)
        self.dist = group if isinstance(group, Distributed) or group is None else resolve(group)
        n = inputs[0].shape[0]
        # several processes: this rank's share of the global mean loss, L = sum_r (n_r/N) L_r
        self._weight = 1.0
        if self.dist is not None:
            counts = self.dist.counts(n)
            self._weight = n / sum(counts)
        fm = as_functional(model, params)  # (adapt returns no DDP wrapper: unwrapped above)
        self.fm = fm
        self.loss_fn = loss_fn
        self.names = fm.names
        self.dim = fm.numel
        first = next(iter(fm.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.scale, self.threshold = _resolve_preconditioner(preconditioner, model, fm)
        if n == 0:  # a rank without examples in the global batch: products are zero here
            self._chunks = []
        elif batch_size is None or batch_size >= n:
            self._chunks = [(inputs, targets, 1.0)]
        else:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self._chunks = []
            for s in range(0, n, batch_size):
                xs = tuple(x[s:s + batch_size] for x in inputs)
                ys = None if targets is None else targets[s:s + batch_size]
                self._chunks.append((xs, ys, xs[0].shape[0] / n))
        self.num_matvecs = 0
        self._leaves = self._grads = None

    def _cached_graph(self) -> bool:
        """Whole-batch path: the gradient with ``create_graph``, built at the first product or
        gradient (not in the constructor, so that a caller's memory check comes first)."""
        if len(self._chunks) != 1:
            return False
        if self._grads is None:
            xs, ys, _ = self._chunks[0]
            leaves = {n: p.detach().requires_grad_() for n, p in self.fm.params.items()}
            with torch.enable_grad(), differentiable_kernels():
                loss = self.loss_fn(self.fm(leaves, *xs), ys)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                            allow_unused=True, materialize_grads=True)
            self._leaves, self._grads = list(leaves.values()), grads
            # gradients that do not depend on w (loss linear in that tensor): H-rows of zero
            self._live = [i for i, g in enumerate(grads) if g.requires_grad]
        return True

    def _hvp(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        fm, loss_fn = self.fm, self.loss_fn
        if not self._chunks:
            return {n: torch.zeros_like(t) for n, t in v.items()}
        if self._cached_graph():
            vs = list(v.values())
            if not self._live:
                return {n: torch.zeros_like(t) for n, t in v.items()}
            hv = torch.autograd.grad([self._grads[i] for i in self._live], self._leaves,
                                     [vs[i] for i in self._live], retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return dict(zip(v, hv))
        total = None
        for xs, ys, weight in self._chunks:
            def loss(p, xs=xs, ys=ys):
                return loss_fn(fm(p, *xs), ys)

            with differentiable_kernels():
                _, hv = _func_jvp(grad(loss), (fm.params,), (v,))
            if weight != 1.0:
                hv = {n: t * weight for n, t in hv.items()}
            total = hv if total is None else {n: total[n] + hv[n] for n in hv}
        return total

    def gradient(self) -> Tensor:
        r"""The loss gradient in the operator's coordinates, :math:`D\,\nabla_w L` (flat; the
        gradient of :math:`u \mapsto L(D u)`, whose Hessian is :math:`DHD`), without graph.

        Free on the whole-batch path (the cached gradient); with ``batch_size`` one gradient
        pass over the chunks, :math:`\sum_c \frac{n_c}{n} \nabla L_c`. Not counted in
        :attr:`num_matvecs`."""
        if self._cached_graph():
            g = torch.cat([t.detach().reshape(-1) for t in self._grads])
        else:
            g = None
            for xs, ys, weight in self._chunks:
                with differentiable_kernels():
                    _, gc = loss_and_grad(self.fm, self.loss_fn, xs, ys)
                gc = flatten(gc) * weight
                g = gc if g is None else g + gc
            if g is None:
                g = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        g = self._combine(g)
        return g if self.scale is None else g * self.scale

    def _combine(self, local: Tensor) -> Tensor:
        r"""Several processes: the global-batch value, :math:`\sum_r \frac{n_r}{N}` (rank
        :math:`r`'s value), all-reduced (the same on every rank); one process: ``local``."""
        if self.dist is None:
            return local
        return self.dist.sum(local * self._weight)

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`D H D v` for a flat vector ``v`` of length :attr:`dim`."""
        # contiguous: a strided vector (a column of a matrix) gives strided pieces to autograd,
        # which made each product markedly slower (issue 18)
        v = v.reshape(-1).to(dtype=self.dtype, device=self.device).contiguous()
        if self.scale is not None:
            v = v * self.scale
        hv = self._combine(flatten(self._hvp(unflatten(v, self.fm.params))))
        if self.scale is not None:
            hv = hv * self.scale
        self.num_matvecs += 1
        return hv

    __call__ = matvec
