r"""Loss curvature: sharpness (top Hessian eigenvalues), preconditioned (adaptive) sharpness, the
Hessian trace and its spectral density, for any ``nn.Module``, matrix-free.

Notation: :math:`L(w) = \texttt{loss\_fn}(f(X; w), Y)` on a fixed batch, exactly as the loss
function defines it (with ``mean`` reduction :math:`H` is the batch-averaged Hessian;
with MSE written as :math:`\frac12\,\mathrm{mean}(f-y)^2` the GD stability threshold is the usual
:math:`2/\eta`). :math:`H = \nabla_w^2 L` over the selected parameters :math:`w` (a subset gives
the diagonal block :math:`H_{SS}`).

* **Sharpness** :math:`\lambda_1(H)` and the next ``k - 1`` eigenvalues, by Lanczos
  (:func:`lmech.core.lanczos`) on Hessian-vector products. Under full-batch GD with step
  :math:`\eta`, :math:`\lambda_1` rises to :math:`2/\eta` and hovers there (Cohen et al., *Gradient
  Descent on Neural Networks Typically Occurs at the Edge of Stability*, ICLR 2021).
* **Preconditioned sharpness** :math:`\lambda_1(P^{-1}H) = \lambda_1(P^{-1/2} H P^{-1/2})` for a
  diagonal preconditioner :math:`P` (the symmetric form is what Lanczos runs on). For Adam/AdamW
  (Cohen et al., *Adaptive Gradient Methods at the Edge of Stability*, 2022) this module uses

  .. math::
      P = \operatorname{diag}\Big(\frac{(1-\beta_1^t)\,(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)}
      {\eta}\Big),

  read from the optimizer state (``exp_avg_sq`` :math:`v_t`, ``step`` :math:`t`, and each
  parameter group's ``lr`` :math:`\eta`, ``betas``, ``eps``; ``max_exp_avg_sq`` with
  ``amsgrad``). With it Adam's update is exactly :math:`w_{t+1} = w_t - P^{-1} m_t` on the raw
  momentum EMA :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`, and the linear stability limit of
  that EMA iteration on a quadratic is :math:`\lambda_1(P^{-1}H) = (2 + 2\beta_1)/(1 - \beta_1)`
  (38 for :math:`\beta_1 = 0.9`), *dimensionless* because :math:`\eta` is inside :math:`P`; the
  paper's form :math:`38/\eta` is the same statement with :math:`\eta` outside :math:`P`. The
  learning rate inside :math:`P` makes per-group learning rates work. AdamW's decoupled weight
  decay (:math:`-\eta\lambda w`) is ignored, as in the paper. The threshold is returned as
  :attr:`SharpnessResult.threshold`.
* **Trace** :math:`\operatorname{tr} H` by Hutch++ or Hutchinson, with a standard error.
* **Spectral density** of :math:`H` by stochastic Lanczos quadrature.

Every function has a per-layer form through ``params`` (a parameter subset gives that block of
:math:`H`) and :func:`sharpness_per_layer`. Memory: the Lanczos basis (``max_iter + 1`` vectors
of the selected size) is checked against ``max_bytes`` before allocation; large batches can be
processed in chunks (``batch_size``) when the loss is a mean over examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import grad
from torch.func import jvp as _func_jvp

from lmech.core.functional import (
    DEFAULT_MAX_BYTES,
    FunctionalModel,
    as_functional,
    ParamSelector,
    flatten,
    loss_and_grad,
    unflatten,
)
from lmech.core.linalg import (
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_memory_check,
    slq,
)
from lmech.core.batch import Output, adapt
from lmech.probes.base import Cost, TrainState, differentiable_kernels, layer_groups, split_batch, subsample
from lmech.probes.precision import full_precision

__all__ = [
    "HessianOperator",
    "adam_preconditioner",
    "SharpnessResult",
    "sharpness",
    "sharpness_per_layer",
    "hessian_trace",
    "hessian_spectral_density",
    "SharpnessProbe",
    "HessianTraceProbe",
    "SpectralDensityProbe",
]

# --------------------------------------------------------------------------------------------
# Preconditioner
# --------------------------------------------------------------------------------------------


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module, params: ParamSelector = None
) -> tuple[dict[str, Tensor], float]:
    r"""Adam/AdamW's diagonal preconditioner and its stability threshold.

    Returns ``(P, threshold)``: ``P[name]`` (shaped like the parameter) holds
    :math:`(1-\beta_1^t)(\sqrt{v_t/(1-\beta_2^t)}+\epsilon)/\eta` for every selected parameter (see
    the module docstring), and ``threshold`` is :math:`(2+2\beta_1)/(1-\beta_1)`. Works for any
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
        model = model if isinstance(model, FunctionalModel) else unwrap(model)
        self.dist = group if isinstance(group, Distributed) or group is None else resolve(group)
        n = inputs[0].shape[0]
        # several processes: this rank's share of the global mean loss, L = sum_r (n_r/N) L_r
        self._weight = 1.0
        if self.dist is not None:
            counts = self.dist.counts(n)
            self._weight = n / sum(counts)
        if isinstance(model, FunctionalModel):
            if params is not None:
                raise ValueError("pass `params` only with an nn.Module; a FunctionalModel has its own")
            fm = model
        else:
            fm = FunctionalModel(model, params)
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


# --------------------------------------------------------------------------------------------
# Sharpness
# --------------------------------------------------------------------------------------------


@dataclass
class SharpnessResult:
    r"""Top eigenvalues of :math:`H` (or :math:`P^{-1/2} H P^{-1/2}`).

    Attributes:
        eigenvalues: ``(k,)`` descending Ritz values (float64).
        residuals: ``(k,)`` :math:`\|A y_i - \theta_i y_i\|`; an eigenvalue of the operator lies
            within it (:class:`lmech.core.EigenResult`).
        converged: every pair met ``residual <= tol * |theta|``.
        num_hvps: Hessian-vector products used.
        eigenvectors: ``(dim, k)`` flat unit Ritz vectors in the operator's coordinates (for a
            preconditioned operator: eigenvectors of :math:`P^{-1/2}HP^{-1/2}`); pass
            ``eigenvectors[:, 0]`` as ``v0`` next time to warm-start.
        names: the parameters, in flat order.
        threshold: the stability threshold to compare :math:`\lambda_1` with when it is known
            from the optimizer (Adam: :math:`(2+2\beta_1)/(1-\beta_1)`), else ``None``.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: bool
    num_hvps: int
    eigenvectors: Tensor | None
    names: list[str]
    threshold: float | None = None

    @property
    def top(self) -> float:
        r""":math:`\lambda_1` as a float."""
        return float(self.eigenvalues[0])

    @property
    def relative_error_bound(self) -> Tensor:
        r""":math:`r_i / |\theta_i|`, a bound on each eigenvalue's relative error."""
        return self.residuals / self.eigenvalues.abs().clamp_min(1e-300)


@full_precision()
def sharpness(
    model,
    loss_fn: Callable,
    batch,
    k: int = 1,
    preconditioner=None,
    params: ParamSelector = None,
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    start: Literal["gradient", "random"] = "gradient",
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    group=None,
    output: Output = None,
) -> SharpnessResult:
    r"""Top-``k`` eigenvalues of the loss Hessian on ``batch``, by Lanczos on HVPs.

    Args:
        model: an ``nn.Module`` (run as it is: call ``model.eval()`` first for dropout-free,
            batch-independent curvature) or a :class:`lmech.core.FunctionalModel`.
        loss_fn: ``loss_fn(model(*inputs), targets)``, a scalar.
        batch: ``(inputs, targets)`` or a dict (``model(**batch)``; dict, nested and tuple
            forms in :mod:`lmech.core.batch`).
        k: number of top eigenvalues.
        preconditioner: ``None`` (plain :math:`H`), an Adam/AdamW optimizer (adaptive sharpness
            :math:`\lambda(P^{-1/2}HP^{-1/2})` with :math:`P` as in the module docstring, and
            ``threshold`` set), or a dict ``name -> positive diagonal P`` shaped like each
            parameter.
        params: parameter subset (name, prefix, list, or predicate): the block :math:`H_{SS}`.
        tol: relative residual at which Lanczos stops (a bound on the relative error of each
            eigenvalue).
        max_iter: most HVPs (default ``max(2k + 40, 80)``, capped at the dimension).
        v0: warm start (flat, length ``dim``), e.g. the previous ``eigenvectors[:, 0]``.
        start: the start vector when ``v0`` is not given. ``"gradient"`` (default):
            :math:`v_0 = \hat g + \hat z`, the unit loss gradient (in the operator's
            coordinates, :meth:`HessianOperator.gradient`; free on the whole-batch path) plus a
            unit Gaussian vector. The gradient of a trained network often lies largely in the
            span of the top Hessian eigenvectors (Gur-Ari, Roberts & Dyer, *Gradient Descent
            Happens in a Tiny Subspace*, 2018), so its overlap with them is far above a random
            vector's :math:`\approx 1/\sqrt{\dim}` and Lanczos often needs fewer products
            (not in every case: measurements in ``docs/results/probes.md``); the random half keeps a nonzero overlap
            with every eigenvector (almost surely) when the gradient has none, e.g. at a
            stationary point, where a zero or non-finite gradient falls back to the random
            vector alone. ``"random"``: the Gaussian vector alone. The stopping rule and its
            certificate do not depend on the start.
        seed: seeds the random start vector (own generator; the global RNG is untouched).
        batch_size: evaluate HVPs in chunks of this many examples (mean-reduced loss only).
        max_bytes: budget for the Lanczos basis.
        callback: ``(hvps, ritz_values, residuals)`` after every HVP (see
            :func:`lmech.core.lanczos`).
        group: several processes (:class:`HessianOperator`): ``batch`` is this rank's shard;
            the start vector is rank 0's (broadcast), so every rank runs the same iteration.
        output: what ``loss_fn`` sees of the model's output: ``None`` (as it is), a field name
            (``"logits"`` of a ``ModelOutput``), an index or a callable (:mod:`lmech.core.batch`).

    Returns:
        :class:`SharpnessResult`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(64, 5, dtype=torch.float64)
        >>> net = nn.Linear(5, 1, bias=False).double()
        >>> mse = lambda o, y: 0.5 * ((o - y) ** 2).mean()
        >>> res = sharpness(net, mse, (x, torch.zeros(64, 1, dtype=torch.float64)), k=2, tol=1e-10)
        >>> exact = torch.linalg.eigvalsh(x.T @ x / 64).flip(0)[:2]   # H = X^T X / n
        >>> torch.allclose(res.eigenvalues, exact)
        True
    """
    if start not in ("gradient", "random"):
        raise ValueError(f"start must be 'gradient' or 'random', got {start!r}")
    op = HessianOperator(model, loss_fn, batch, params, preconditioner, batch_size, group, output=output)
    lanczos_memory_check(op.dim, k, max_iter, op.dtype, max_bytes)  # before any gradient is taken
    if v0 is None and start == "gradient":
        v0 = _gradient_start(op, seed)
    if op.dist is not None and v0 is not None:
        v0 = op.dist.broadcast(v0.reshape(-1).to(op.dtype))
    res: EigenResult = lanczos(
        op.matvec, op.dim, k, which="LA", tol=tol, max_iter=max_iter, v0=v0, seed=seed,
        dtype=op.dtype, device=op.device, max_bytes=max_bytes, callback=callback,
    )
    return SharpnessResult(
        eigenvalues=res.eigenvalues,
        residuals=res.residuals,
        converged=res.converged,
        num_hvps=op.num_matvecs,
        eigenvectors=res.eigenvectors,
        names=op.names,
        threshold=op.threshold,
    )


def _gradient_start(op: HessianOperator, seed: int) -> Tensor | None:
    """``g/|g| + z/|z|`` (``start="gradient"`` of :func:`sharpness`), ``z`` the same Gaussian
    vector a random start draws from ``seed``; ``None`` (random start) when ``g`` is zero or
    not finite."""
    g = op.gradient().to(op.dtype)
    norm = torch.linalg.vector_norm(g)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    z = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=op.dtype).to(op.device)
    return g / norm + z / torch.linalg.vector_norm(z)


def sharpness_per_layer(
    model: nn.Module,
    loss_fn: Callable,
    batch,
    groups: dict[str, ParamSelector] | None = None,
    k: int = 1,
    preconditioner=None,
    **kwargs,
) -> dict[str, SharpnessResult]:
    r"""Top eigenvalues of each diagonal Hessian block :math:`H_{\ell\ell}` (the curvature seen by
    one layer's parameters with the others held fixed).

    ``groups`` maps a label to a parameter selector (default :func:`layer_groups`: one group per
    module that owns parameters). Other keyword arguments go to :func:`sharpness`. Note that
    :math:`\max_\ell \lambda_1(H_{\ell\ell}) \le \lambda_1(H)` (Cauchy interlacing), so the
    per-layer values locate curvature, they do not add up to it.
    """
    if groups is None:
        groups = layer_groups(model)
    return {label: sharpness(model, loss_fn, batch, k, preconditioner, sel, **kwargs)
            for label, sel in groups.items()}


# --------------------------------------------------------------------------------------------
# Trace and spectral density
# --------------------------------------------------------------------------------------------


@full_precision()
def hessian_trace(
    model,
    loss_fn: Callable,
    batch,
    params: ParamSelector = None,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    num_matvecs: int = 30,
    preconditioner=None,
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    group=None,
    output: Output = None,
) -> TraceEstimate:
    r""":math:`\operatorname{tr} H` (or :math:`\operatorname{tr} P^{-1}H`) by Hutch++ (default) or
    Hutchinson with ``num_matvecs`` HVPs; returns a :class:`lmech.core.TraceEstimate` with a
    standard error (``batch`` and ``output`` as in :func:`sharpness`). Hutch++ is much more accurate when a few large eigenvalues dominate the
    trace (the usual Hessian spectrum: a bulk near 0 and a few outliers).

    Example:
        >>> x = torch.randn(50, 4, dtype=torch.float64)
        >>> net = nn.Linear(4, 1, bias=False).double()
        >>> mse = lambda o, y: 0.5 * ((o - y) ** 2).mean()
        >>> est = hessian_trace(net, mse, (x, torch.zeros(50, 1, dtype=torch.float64)), num_matvecs=12)
        >>> abs(est.value - float((x ** 2).sum() / 50)) < 1e-8   # d = 4 <= 12/3: exact
        True

    ``group=``: several processes (:class:`HessianOperator`); the random probe vectors come from
    ``seed`` on every rank, so all ranks use the same ones.
    """
    op = HessianOperator(model, loss_fn, batch, params, preconditioner, batch_size, group, output=output)
    if method == "hutch++":
        return hutchpp_trace(op.matvec, op.dim, num_matvecs, seed=seed, dtype=op.dtype,
                             device=op.device, max_bytes=max_bytes)
    if method == "hutchinson":
        return hutchinson_trace(op.matvec, op.dim, num_matvecs, seed=seed, dtype=op.dtype,
                                device=op.device)
    raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")


@full_precision()
def hessian_spectral_density(
    model,
    loss_fn: Callable,
    batch,
    params: ParamSelector = None,
    *,
    num_probes: int = 4,
    num_steps: int = 40,
    preconditioner=None,
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    group=None,
    output: Output = None,
) -> SpectralDensity:
    r"""Spectral density of :math:`H` by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao,
    *An Investigation into Neural Net Optimization via Hessian Eigenvalue Density*, 2019):
    ``num_probes * num_steps`` HVPs; see :class:`lmech.core.SpectralDensity` (``.density(grid,
    sigma)``, ``.trace(f)``); ``group=`` as :func:`hessian_trace`; ``batch`` and ``output`` as in :func:`sharpness`."""
    op = HessianOperator(model, loss_fn, batch, params, preconditioner, batch_size, group, output=output)
    return slq(op.matvec, op.dim, num_probes, num_steps, seed=seed, dtype=op.dtype,
               device=op.device, max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


class SharpnessProbe:
    r"""Monitor probe: :math:`\lambda_1..\lambda_k` of :math:`H` on the probe batch.

    Metrics: ``lambda_1`` .. ``lambda_k``, ``rel_error`` (residual bound on :math:`\lambda_1`),
    ``hvps``; with ``preconditioned=True`` (an Adam-type optimizer must be passed to
    ``Monitor.step``) or ``"auto"`` (when one is): ``adaptive_lambda_1`` .. and
    ``adaptive_threshold`` (:math:`(2+2\beta_1)/(1-\beta_1)`, the value
    :math:`\lambda_1(P^{-1}H)` hovers at under Adam's edge of stability); with
    ``per_layer=True``: ``lambda_1/<layer>`` for every
    :func:`layer_groups` block. Warm-starts each Lanczos run from the previous Ritz vectors
    (their sum), which cuts the HVP count when the curvature moves slowly; the first
    measurement starts from the gradient (:func:`sharpness`, ``start="gradient"``). The
    certificate (``rel_error``) does not depend on the start. ``num_examples`` uses the first
    examples of the probe batch only (cheaper; the Hessian of that subset).

    Example:
        >>> probe = SharpnessProbe(k=2, per_layer=True)
        >>> probe.name, probe.cost
        ('sharpness', 'high')
    """

    name = "sharpness"
    cost: Cost = "high"
    shards = True  # several processes: all-reduced Hessian-vector products (HessianOperator)

    def __init__(self, k: int = 1, *, preconditioned: bool | str = False, per_layer: bool = False,
                 tol: float = 1e-2, max_iter: int | None = None, warm_start: bool = True,
                 num_examples: int | None = None, seed: int = 0):
        self.k, self.preconditioned, self.per_layer = k, preconditioned, per_layer
        self.tol, self.max_iter, self.warm_start, self.seed = tol, max_iter, warm_start, seed
        self.num_examples = num_examples
        self._v0: dict[str, Tensor] = {}

    def _run(self, key, state, preconditioner, params, k=None) -> SharpnessResult:
        v0 = self._v0.get(key) if self.warm_start else None
        if state.dist is None:
            batch, d = subsample(state.batch, self.num_examples), None
        else:  # the first examples of the global batch
            batch, d = state.dist.first_examples(state.batch, self.num_examples)
        res = sharpness(state.model, state.loss_fn, batch, k or self.k, preconditioner, params,
                        tol=self.tol, max_iter=self.max_iter, v0=v0, seed=self.seed,
                        max_bytes=state.max_bytes, group=d)
        if self.warm_start and res.eigenvectors is not None:
            # the sum of the previous Ritz vectors: its Krylov space holds all k of them
            self._v0[key] = res.eigenvectors.sum(1)
        return res

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        if state.dist is not None:
            holder = state.dist.first_examples(state.batch, self.num_examples)[1].sole_holder()
            if holder is not None:  # all on one rank: computed there (warm starts kept there too)
                return state.dist.on_rank(holder, lambda: self.measure(dataclasses.replace(state, dist=None)))
        out: dict[str, float | Tensor] = {}
        res = self._run("global", state, None, state.params)
        for i, ev in enumerate(res.eigenvalues.tolist()):
            out[f"lambda_{i + 1}"] = ev
        out["rel_error"] = float(res.relative_error_bound[0])
        out["hvps"] = float(res.num_hvps)
        adaptive = self.preconditioned is True
        if self.preconditioned == "auto" and state.optimizer is not None:
            try:  # an Adam-type optimizer with state for every selected parameter?
                adam_preconditioner(state.optimizer, state.model, state.params)
                adaptive = True
            except ValueError:
                adaptive = False
        if adaptive:
            if state.optimizer is None:
                raise ValueError("SharpnessProbe(preconditioned=True) needs the optimizer: call "
                                 "monitor.step(step, optimizer=opt)")
            ada = self._run("adaptive", state, state.optimizer, state.params)
            for i, ev in enumerate(ada.eigenvalues.tolist()):
                out[f"adaptive_lambda_{i + 1}"] = ev
            out["adaptive_threshold"] = float(ada.threshold)
        if self.per_layer:
            for label, names in layer_groups(state.model, state.params).items():
                out[f"lambda_1/{label}"] = self._run(("layer", label), state, None, names, k=1).top
        return out


class HessianTraceProbe:
    r"""Monitor probe: ``trace`` :math:`\operatorname{tr}H` (Hutch++), its ``trace_stderr``, and
    ``trace/<layer>`` per layer block when ``per_layer=True`` (these do add up to the global
    trace: the trace of a block-diagonal part)."""

    name = "hessian_trace"
    cost: Cost = "high"
    shards = True  # several processes: all-reduced Hessian-vector products (HessianOperator)

    def __init__(self, num_matvecs: int = 30, *, per_layer: bool = False, seed: int = 0):
        self.num_matvecs, self.per_layer, self.seed = num_matvecs, per_layer, seed

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        est = hessian_trace(state.model, state.loss_fn, state.batch, state.params,
                            num_matvecs=self.num_matvecs, seed=self.seed, max_bytes=state.max_bytes,
                            group=state.dist)
        out: dict[str, float | Tensor] = {"trace": est.value, "trace_stderr": est.stderr}
        if self.per_layer:
            for label, names in layer_groups(state.model, state.params).items():
                out[f"trace/{label}"] = hessian_trace(
                    state.model, state.loss_fn, state.batch, names, num_matvecs=self.num_matvecs,
                    seed=self.seed, max_bytes=state.max_bytes, group=state.dist).value
        return out


class SpectralDensityProbe:
    r"""Monitor probe: the SLQ spectral density of :math:`H`. Metrics: ``nodes`` and ``weights``
    (flattened arrays of all probes' quadrature rules, enough to redraw the density) and
    ``density`` evaluated on ``grid_size`` points spanning the nodes, with ``grid_min`` /
    ``grid_max``; Gaussian width ``sigma`` relative to that span."""

    name = "hessian_density"
    cost: Cost = "high"
    shards = True  # several processes: all-reduced Hessian-vector products (HessianOperator)

    def __init__(self, num_probes: int = 2, num_steps: int = 30, *, grid_size: int = 200,
                 sigma: float = 0.01, seed: int = 0):
        self.num_probes, self.num_steps, self.grid_size = num_probes, num_steps, grid_size
        self.sigma, self.seed = sigma, seed

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        sd = hessian_spectral_density(state.model, state.loss_fn, state.batch, state.params,
                                      num_probes=self.num_probes, num_steps=self.num_steps,
                                      seed=self.seed, max_bytes=state.max_bytes, group=state.dist)
        lo, hi = float(sd.nodes.min()), float(sd.nodes.max())
        span = max(hi - lo, 1e-12)
        lo, hi = lo - 0.05 * span, hi + 0.05 * span
        grid = torch.linspace(lo, hi, self.grid_size, dtype=torch.float64)
        return {
            "nodes": sd.nodes.reshape(-1),
            "weights": sd.weights.reshape(-1),
            "density": sd.density(grid, self.sigma * span),
            "grid_min": lo,
            "grid_max": hi,
        }
