"""Functional core: any ``nn.Module`` as a pure function of its parameters (``torch.func``).

Parameter selection, loss gradients, per-example gradients, and matrix-free Jacobian-vector,
vector-Jacobian and Hessian-vector products, plus flat-vector helpers. See
:mod:`lmech.core.functional` for the math and conventions. Matrix-free linear algebra on
flat-vector operators (Lanczos, Hutchinson / Hutch++ trace, stochastic Lanczos quadrature) is in
:mod:`lmech.core.linalg`.
"""

from lmech.core.functional import (
    DEFAULT_MAX_BYTES,
    FunctionalModel,
    ParamSelector,
    differentiable_kernels,
    flatten,
    hvp,
    jacobian,
    jvp,
    loss_and_grad,
    per_example_grads,
    tree_add,
    tree_dot,
    tree_scale,
    unflatten,
    vjp,
)
from lmech.core.linalg import (
    EigenResult,
    MemoryBudgetError,
    SpectralDensity,
    TraceEstimate,
    check_memory,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FunctionalModel",
    "ParamSelector",
    "differentiable_kernels",
    "flatten",
    "hvp",
    "jacobian",
    "jvp",
    "loss_and_grad",
    "per_example_grads",
    "tree_add",
    "tree_dot",
    "tree_scale",
    "unflatten",
    "vjp",
    "EigenResult",
    "MemoryBudgetError",
    "SpectralDensity",
    "TraceEstimate",
    "check_memory",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "slq",
]
