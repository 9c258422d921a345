r"""Self-influence of each training example from one training run, and the run's complexity measure.

Source and reading. Litman & Guo (arXiv 2605.01172, App. G "Complexity Measure and
Self-Influence"; Thm G.10 and Cor. G.13 are quoted elsewhere as "an infinitesimal reweighting
derivative and a finite-perturbation Taylor remainder") define a per-example self-influence
along the realized training path and a complexity measure built from it. The statements were not
recovered (``shared/research/generalization-theory.md`` 1.7), so this module implements the
reading that follows from lmech's path operators and says so: the **leave-one-out self-influence
of the path smoother**, the classic definition of self-influence (the change in an example's own
loss when it is left out of training; Koh & Liang 2017, Feldman & Zhang 2020's memorization score)
evaluated with the run's hat matrix instead of retraining.

The smoother. :class:`lmech.probes.gramian.PathRecorder` accumulates :math:`D` with
:math:`U_S(T) - U_S(0) \approx -D\,g_0`; the targets enter only through :math:`g_0`, so
:math:`H = D/n = \partial U_S(T)/\partial y` (:mod:`lmech.probes.path_loo`). With the
:math:`o\times o` block :math:`H_{ii}`, the loss gradient :math:`d_i = \nabla_{u_i}\ell_i` and the
output Hessian :math:`B_i`, the leave-one-out output of example :math:`i` is

.. math:: u_i^{(-i)} = u_i + (I - H_{ii}B_i)^{-1}H_{ii}\,d_i

(exact for linear smoothers at their fixed point: least squares, kernel ridge regression), and

.. math:: \mathrm{SI}_i = \ell\big(u_i^{(-i)}, y_i\big) - \ell(u_i, y_i) \;\ge 0, \qquad
          C = \frac1n\sum_i \mathrm{SI}_i = \widehat R_\text{loo} - \Phi_S .

For one output and the squared loss, :math:`\mathrm{SI}_i = \frac12 r_i^2\big[(1-h_i)^{-2} - 1\big]`
with :math:`r_i = u_i - y_i`, :math:`h_i = H_{ii}`. The complexity measure :math:`C` is the
estimated generalization gap (leave-one-out risk minus training loss); ``df`` :math:`=\sum_i
\mathrm{tr}(H_{ii}B_i)` is the run's effective number of fitted parameters (the generalized degrees
of freedom of Ye 1998, :math:`\sum_i \partial u_i/\partial y_i`). A mislabeled example is one the
rest of the data predicts badly: large :math:`\ell(u_i^{(-i)}, y_i)`; whether the network has
memorized it (small :math:`r_i`, :math:`h_i \to 1`) or not (large :math:`r_i`), its
self-influence is large.

Baselines (the noisy-label benchmark, ``scripts/no_validation_study.py``): the final per-example
loss, the loss at an early step, and :class:`TracInSelfInfluence` (Pruthi et al. 2020: the
gradient-norm self-influence :math:`\sum_t \eta_t\|\nabla_w\ell_i(w_t)\|^2` over checkpoints).

Where it does not hold: as :mod:`lmech.probes.path_loo` (biased before convergence, the realized
path's preconditioner and Jacobians are not differentiated in the labels, ``nan`` with weight
decay). Tests: ``tests/test_self_influence.py`` (exact leave-one-out by retraining on a linear
model; retraining a small MLP).

Example:
    >>> import torch
    >>> u, y = torch.zeros(8, 1), torch.ones(8, 1)
    >>> si = path_self_influence(4 * torch.eye(8, dtype=torch.float64), u, y)   # H = D/n = I/2
    >>> round(float(si.scores[0]), 4)          # 1/2 * 1 * (1/(1-0.5)^2 - 1)
    1.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from lmech.probes.path_loo import leave_one_out_outputs

__all__ = ["SelfInfluence", "path_self_influence", "TracInSelfInfluence", "per_example_loss"]


@dataclass(frozen=True)
class SelfInfluence:
    """Per-example scores (float64, ``(n,)``) and the run's complexity measure (module docstring).

    Attributes:
        scores: :math:`\\mathrm{SI}_i`.
        loo_loss: :math:`\\ell(u_i^{(-i)}, y_i)`.
        loss: :math:`\\ell(u_i, y_i)`.
        leverage: :math:`\\mathrm{tr}\\,H_{ii}/o`.
        complexity: :math:`C = \\mathrm{mean}_i\\,\\mathrm{SI}_i`.
        df: :math:`\\sum_i\\mathrm{tr}(H_{ii}B_i)`.
    """

    scores: Tensor
    loo_loss: Tensor
    loss: Tensor
    leverage: Tensor
    complexity: float
    df: float


def path_self_influence(D: Tensor, u: Tensor, y: Tensor, loss: str = "mse") -> SelfInfluence:
    r"""Self-influence of every training example from the path operator (module docstring).

    Args:
        D: :math:`N\times N` (:math:`N = no`, example-major), a recorder's cumulative ``path.D``
            (from the initial weights).
        u: training outputs at the end of the path, ``(n, o)``.
        y: targets, ``(n, o)`` for ``"mse"`` (:math:`\ell = \frac12\|u-y\|^2`), class indices ``(n,)``
            for ``"cross_entropy"``.
    """
    parts = leave_one_out_outputs(D, u, y, loss)
    loo_loss, own = parts.losses(parts.u_loo), parts.losses(parts.u)
    scores = loo_loss - own
    return SelfInfluence(scores=scores, loo_loss=loo_loss, loss=own,
                         leverage=parts.H.diagonal(dim1=1, dim2=2).sum(1) / parts.u.shape[1],
                         complexity=float(scores.mean()), df=float(parts.HB.diagonal(dim1=1, dim2=2).sum()))


def per_example_loss(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> Tensor:
    """``loss_fn`` of each example as a batch of one, ``(n,)`` float64 (eval mode, no gradients)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
        losses = torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(out.shape[0])])
    model.train(was)
    return losses.double()


class TracInSelfInfluence:
    r"""TracIn self-influence (Pruthi et al., *Estimating Training Data Influence by Tracing Gradient
    Descent*, NeurIPS 2020), the gradient-norm baseline:

    .. math:: \mathrm{TracIn}_i = \sum_{c} \eta_c\,\|\nabla_w \ell(f(x_i; w_c), y_i)\|^2

    over checkpoints :math:`w_c`, each weighted by the learning rate times the steps it stands for
    (``step(lr, steps)``). Per-example gradients by ``torch.func`` (``vmap(grad)``), in eval mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1, bias=False)
        >>> tr = TracInSelfInfluence(net, lambda o, t: 0.5 * (o - t).pow(2).sum(), torch.eye(2), torch.zeros(2, 1))
        >>> with torch.no_grad(): _ = net.weight.fill_(1.0)
        >>> tr.step(lr=0.1); [round(v, 4) for v in tr.scores.tolist()]   # grad of example i = e_i
        [0.1, 0.1]
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.scores = torch.zeros(x.shape[0], dtype=torch.float64)

    def grad_norms_sq(self) -> Tensor:
        """:math:`\\|\\nabla_w\\ell_i\\|^2` at the current weights, ``(n,)``."""
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}

        def one(p, xi, yi):
            out = functional_call(self.model, (p, buffers), (xi.unsqueeze(0),))
            return self.loss_fn(out, yi.unsqueeze(0))

        was = self.model.training
        self.model.eval()
        try:
            g = vmap(grad(one), in_dims=(None, 0, 0))(params, self.x, self.y)
        finally:
            self.model.train(was)
        return sum(v.reshape(v.shape[0], -1).double().pow(2).sum(1) for v in g.values())

    def step(self, lr: float, steps: int = 1) -> None:
        """Add the checkpoint at the current weights, standing for ``steps`` steps at ``lr``."""
        self.scores += float(lr) * steps * self.grad_norms_sq()
