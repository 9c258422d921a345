r"""The whole Hessian spectrum, matrix-free: the trace :math:`\operatorname{tr} H` (or
:math:`\operatorname{tr} P^{-1}H`) by Hutch++ or Hutchinson with a standard error, and the spectral
density by stochastic Lanczos quadrature, on :class:`lmech.probes.hessian.HessianOperator`
(notation in :mod:`lmech.probes.sharpness`); with their Monitor probes.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from lmech.core.batch import Output
from lmech.core.functional import DEFAULT_MAX_BYTES, ParamSelector
from lmech.core.linalg import SpectralDensity, TraceEstimate, hutchinson_trace, hutchpp_trace, slq
from lmech.probes.base import Cost, TrainState, layer_groups
from lmech.probes.hessian import HessianOperator
from lmech.probes.precision import full_precision

__all__ = ["hessian_trace", "hessian_spectral_density", "HessianTraceProbe", "SpectralDensityProbe"]


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
    standard error (``batch`` and ``output`` as in :func:`lmech.probes.sharpness.sharpness`). Hutch++ is much more accurate when a few large eigenvalues dominate the
    trace (the usual Hessian spectrum: a bulk near 0 and a few outliers).

    Example:
        >>> from torch import nn
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
    sigma)``, ``.trace(f)``); ``group=`` as :func:`hessian_trace`; ``batch`` and ``output`` as in :func:`lmech.probes.sharpness.sharpness`."""
    op = HessianOperator(model, loss_fn, batch, params, preconditioner, batch_size, group, output=output)
    return slq(op.matvec, op.dim, num_probes, num_steps, seed=seed, dtype=op.dtype,
               device=op.device, max_bytes=max_bytes)

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
