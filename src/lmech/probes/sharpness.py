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

Where the pieces live: the operator and the Adam preconditioner in :mod:`lmech.probes.hessian`,
the trace and the spectral density (and their probes) in :mod:`lmech.probes.hessian_spectrum`,
the top eigenvalues here; every name is importable from this module as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from lmech.core.batch import Output
from lmech.core.functional import DEFAULT_MAX_BYTES, ParamSelector
from lmech.core.linalg import EigenResult, lanczos, lanczos_memory_check
from lmech.probes.base import Cost, TrainState, layer_groups, subsample
from lmech.probes.hessian import HessianOperator, _resolve_preconditioner, adam_preconditioner  # noqa: F401
from lmech.probes.hessian_spectrum import (  # noqa: F401  (re-exported: their former home)
    HessianTraceProbe,
    SpectralDensityProbe,
    hessian_spectral_density,
    hessian_trace,
)
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
    # in place (g is a fresh vector): the same roundings, no three more dim-long allocations
    return g.div_(norm).add_(z.div_(torch.linalg.vector_norm(z)))


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

