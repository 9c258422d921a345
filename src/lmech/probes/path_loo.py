r"""Leave-one-out population-risk estimates carried along the realized training path.

Source and reading. Litman & Guo (arXiv 2605.01172, Sec. 6 and App. F-G) derive a population-risk
objective from one training run by leave-one-out reasoning along the realized path. Their formula
was not recovered verbatim (``shared/research/generalization-theory.md`` 1.6; the stored mirror of
the paper shows only its opening, and no official code was found), so this module implements the
reading that follows from the recorder's own operators and says so: the path's *smoother*.

The smoother. Along the linearized path from the initial weights, the recorder's
:math:`D = \sum_k \eta_k K_k E_k P_k` (:mod:`lmech.probes.gramian`) maps the initial output
gradient to the training-output displacement, :math:`U_S(T) - U_S(0) \approx -D\,g_0`, with
:math:`g_0 = (u_0 - y)/n` (squared loss) or :math:`(\pi(u_0) - p)/n` (cross-entropy with target
distributions :math:`p`). The targets enter only through :math:`g_0`, so

.. math:: H = \frac{\partial U_S(T)}{\partial y} = \frac{D}{n}

(for full-batch gradient descent on the squared loss :math:`H = I - P_g`, the propagator's
complement). :math:`H` is the hat matrix of the training run: the realized preconditioner (Adam's
:math:`1/(\sqrt{\hat v}+\epsilon)`, PopRiskAdamW's gate), the realized minibatches :math:`E_k`,
momentum (carried exactly to first order by the recorder) and the cross-entropy output Hessian
:math:`B_k` are all in :math:`D`; what is *not* differentiated is the dependence of the
preconditioner and of the Jacobians on the labels (the "realized path" reading).

Path-leverage leave-one-out (``poprisk_loo``). Example :math:`i` carries no information about
itself when its target is replaced by its own leave-one-out prediction (the self-consistency that
makes :math:`r_i/(1-H_{ii})` exact for linear smoothers at a fixed point: kernel ridge regression,
least squares). With the :math:`o\times o` diagonal block :math:`H_{ii}`, the loss gradient
:math:`d_i = \nabla_{u_i}\ell_i` and the per-example output Hessian :math:`B_i`
(:math:`I` for the squared loss, :math:`\mathrm{diag}\,\pi_i - \pi_i\pi_i^\top` for softmax
cross-entropy), one Newton step of that fixed point gives

.. math:: u_i^{(-i)} = u_i + (I - H_{ii}B_i)^{-1} H_{ii}\, d_i, \qquad
          \widehat R_\text{loo} = \frac1n \sum_i \ell\big(u_i^{(-i)}, y_i\big),

which for the squared loss and one output is :math:`\frac1n\sum_i \frac12 (r_i / (1 - H_{ii}))^2`
and for cross-entropy is the approximate leave-one-out of generalized linear models (Rad & Maleki,
2020). Units: those of the recorder's loss (:math:`\frac12` squared error summed over outputs,
mean over examples; or mean cross-entropy).

Path GCV (``poprisk_gcv``). Generalized cross-validation replaces every leverage by the mean one:
:math:`\widehat R_\text{gcv} = \Phi_S / (1 - \mathrm{df}/r)^2` with
:math:`\mathrm{df} = \sum_i \mathrm{tr}(H_{ii}B_i)` and :math:`r` the responses, :math:`n\,o` for
the squared loss (:math:`n` per output) and :math:`n\,(o-1)` for softmax cross-entropy (the rank of
each :math:`B_i`). For one output this is :math:`\Phi_S / (1 - \mathrm{tr}\,D/n^2)^2`.

Where it does not hold. Measured (docs/results/signal-reservoir.md): exact once gradient descent on
a frozen kernel has converged, within 4-6% of exact leave-one-out by retraining on the catalog's
label-noise network, but biased before convergence (the self-consistency treats an example's target
as its final leave-one-out output along the whole path) and broken for small networks trained near
interpolation: as the self-leverage goes to 1 both estimates become ratios of vanishing numbers
(GCV, which uses only the mean leverage, degrades more slowly). The recorder must start at the
initial weights (a window opened later gives the leave-one-out of that window only). With weight
decay the decay term
:math:`\lambda w_k` depends on the labels through :math:`w_k`, which :math:`D` does not track, so
the recorder reports ``nan`` for both estimates instead of a biased number.

Tests: ``tests/test_path_loo.py`` (closed-form smoothers, exact leave-one-out by retraining).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LeaveOneOutOutputs", "PathLOO", "leave_one_out_outputs", "path_loo"]


@dataclass(frozen=True)
class PathLOO:
    """The two estimates, the mean self-leverage and the degrees of freedom of the path."""

    loo: float
    gcv: float
    leverage: float
    df: float


@dataclass(frozen=True)
class LeaveOneOutOutputs:
    r"""The pieces both estimates and the self-influence scores are made of (module docstring).

    Attributes:
        H: :math:`(n, o, o)`, the diagonal blocks :math:`H_{ii}` of :math:`D/n` (float64).
        HB: :math:`(n, o, o)`, :math:`H_{ii}B_i`.
        u: training outputs :math:`u_i`, ``(n, o)`` float64.
        u_loo: leave-one-out outputs :math:`u_i^{(-i)}`, ``(n, o)`` float64.
        losses: ``v -> (n,)``, the per-example loss :math:`\ell(v_i, y_i)` of outputs ``v``.
        responses: :math:`r`, :math:`n o` (squared loss) or :math:`n (o-1)` (cross-entropy).
    """

    H: Tensor
    HB: Tensor
    u: Tensor
    u_loo: Tensor
    losses: Callable[[Tensor], Tensor]
    responses: int


def leave_one_out_outputs(D: Tensor, u: Tensor, y: Tensor, loss: str = "mse") -> LeaveOneOutOutputs:
    r"""One Newton step of the leave-one-out fixed point for every example (module docstring):
    :math:`u_i^{(-i)} = u_i + (I - H_{ii}B_i)^{-1} H_{ii} d_i`, with :math:`H = D/n`.

    Args:
        D: :math:`N\times N` (:math:`N = n o`, example-major), the recorder's cumulative ``path.D``
            (from the initial weights).
        u: training outputs at the end of the path, ``(n, o)``.
        y: targets: ``(n, o)`` for ``"mse"`` (:math:`\ell = \frac12\|u-y\|^2`), class indices
            ``(n,)`` for ``"cross_entropy"``.
        loss: ``"mse"`` or ``"cross_entropy"``.
    """
    if u.dim() != 2:
        raise ValueError(f"u must be (n, o) outputs, got shape {tuple(u.shape)}")
    n, o = u.shape
    if D.shape != (n * o, n * o):
        raise ValueError(f"D must be ({n * o}, {n * o}) for {n} examples with {o} outputs, got {tuple(D.shape)}")
    u = u.double()
    H = D.double().reshape(n, o, n, o).diagonal(dim1=0, dim2=2).permute(2, 0, 1) / n   # (n, o, o): H_ii
    eye = torch.eye(o, dtype=torch.float64)
    if loss == "mse":
        y = y.double().reshape(n, o)
        d = u - y                                                                # (n, o)
        B = eye.expand(n, o, o)
        losses = lambda v: 0.5 * (v - y).pow(2).sum(1)                            # noqa: E731
        responses = n * o
    elif loss == "cross_entropy":
        pi = torch.softmax(u, dim=1)
        d = pi - F.one_hot(y.long(), o).double()
        B = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]              # (n, o, o)
        losses = lambda v: F.cross_entropy(v, y.long(), reduction="none")        # noqa: E731
        responses = n * (o - 1)
    else:
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")
    HB = H @ B
    shift = torch.linalg.solve(eye - HB, H @ d.unsqueeze(-1)).squeeze(-1)        # u^(-i) - u_i, (n, o)
    return LeaveOneOutOutputs(H=H, HB=HB, u=u, u_loo=u + shift, losses=losses, responses=responses)


def path_loo(D: Tensor, u: Tensor, y: Tensor, loss: str = "mse") -> PathLOO:
    r"""Leave-one-out and GCV population-risk estimates from the path operator (module docstring).

    Args:
        D: :math:`N\times N` (:math:`N = n o`, example-major), the recorder's cumulative ``path.D``.
        u: training outputs at the end of the path, ``(n, o)``.
        y: targets: ``(n, o)`` for ``"mse"``, class indices ``(n,)`` for ``"cross_entropy"``.
        loss: ``"mse"`` (:math:`\ell = \frac12\|u-y\|^2`) or ``"cross_entropy"``.
    """
    parts = leave_one_out_outputs(D, u, y, loss)
    n, o = parts.u.shape
    loo = float(parts.losses(parts.u_loo).mean())
    phi = float(parts.losses(parts.u).mean())
    df = float(parts.HB.diagonal(dim1=1, dim2=2).sum())
    gcv = phi / (1.0 - df / parts.responses) ** 2
    leverage = float(parts.H.diagonal(dim1=1, dim2=2).sum()) / (n * o)
    return PathLOO(loo=loo, gcv=gcv, leverage=leverage, df=df)
