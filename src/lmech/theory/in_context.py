r"""In-context linear regression: the prompts, and the predictors a trained transformer is
compared with (Garg, Tsipras, Liang & Valiant 2022; Raventós, Paul, Chen & Ganguli 2023;
von Oswald et al. 2023; Ahn et al. 2023; Zhang, Frei & Bartlett 2023).

Prompts. A task is :math:`w \sim \mathcal N(0, I_d/d)` (so :math:`\mathrm{Var}(w^\top x) = 1`);
a prompt holds ``K`` pairs :math:`(x_i, y_i)`, :math:`x_i \sim \mathcal N(0, I_d)`,
:math:`y_i = w^\top x_i + \epsilon_i`, :math:`\epsilon_i \sim \mathcal N(0, \sigma^2)`. With a
finite pool of ``M`` tasks (task diversity), :math:`w` is drawn uniformly from the pool.
Errors are the squared error of the prediction of :math:`y_k` from the first :math:`k` pairs and
:math:`x_k` (:math:`k = 0..K-1` examples in context), in units of :math:`\mathrm{Var}(w^\top x)=1`.

Predictors (all from the first :math:`k` pairs, :math:`X \in \mathbb R^{k\times d}`):

* **ridge** (the Bayes-optimal, posterior-mean predictor for the Gaussian prior):
  :math:`\hat w = (X^\top X + \sigma^2 d\, I)^{-1} X^\top y`;
* **least squares** (minimum norm): :math:`\hat w = X^+ y` (its error peaks at :math:`k = d`
  with noise, where ridge's does not);
* **dMMSE** (Bayes-optimal for the discrete prior uniform on the pool :math:`\{w_m\}`): the
  posterior mean :math:`\sum_m p_m w_m`, :math:`p_m \propto \exp(-\lVert y - Xw_m\rVert^2 / 2\sigma^2)`;
* **one step of gradient descent** from :math:`w_0 = 0` on
  :math:`\frac1{2N}\sum_i (y_i - w^\top x_i)^2`: :math:`\hat y = \frac{\eta}{N}\sum_i y_i x_i^\top x_q`.
  Its expected error over prompts of :math:`N` examples (derived here:
  :math:`\mathbb E\,\mathrm{tr}\,\hat\Sigma^2 = d(N+d+1)/N` for :math:`\hat\Sigma = \frac1N\sum_i x_ix_i^\top`)
  is

  .. math:: \mathcal E(\eta) = s^2 d\Big[\eta^2\frac{N+d+1}{N} - 2\eta + 1\Big]
            + \eta^2\sigma^2\frac dN + \sigma^2, \qquad s^2 = 1/d,

  minimized at :math:`\eta^* = N s^2 / (s^2(N+d+1) + \sigma^2)`. A one-layer *linear*
  self-attention model :math:`\hat y = p^\top\big(\frac1N\sum_i e_ie_i^\top\big) M x_q`,
  :math:`e_i = (x_i, y_i)`, can express exactly the predictors
  :math:`\hat y = x_q^\top A^\top \frac1N\sum_i y_i x_i` plus terms that do not depend on the
  labels' sign; its loss is convex in :math:`A` and invariant under rotations, so its global
  minimum is :math:`A = \eta^* I`: one GD step with the optimal step size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sample_tasks", "sample_prompts", "ridge_errors", "least_squares_errors", "dmmse_errors",
           "gd_step_lr", "gd_step_error"]


def sample_tasks(m: int, d: int, gen: torch.Generator) -> Tensor:
    """``m`` tasks :math:`w \\sim \\mathcal N(0, I_d/d)`, ``(m, d)``."""
    return torch.randn(m, d, generator=gen) / math.sqrt(d)


def sample_prompts(n: int, k: int, d: int, noise: float, gen: torch.Generator,
                   pool: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(x (n, k, d), y (n, k), w (n, d))``: fresh tasks, or tasks drawn uniformly from ``pool``."""
    if pool is None:
        w = sample_tasks(n, d, gen)
    else:
        w = pool[torch.randint(0, pool.shape[0], (n,), generator=gen)]
    x = torch.randn(n, k, d, generator=gen)
    y = torch.einsum("nkd,nd->nk", x, w) + noise * torch.randn(n, k, generator=gen)
    return x, y, w


def _prefix_solve(x: Tensor, y: Tensor, reg: float) -> Tensor:
    """Predictions of :math:`y_k` from the first :math:`k` pairs with ridge ``reg`` (0: min-norm
    least squares), ``(n, K)``; :math:`k = 0` predicts 0."""
    n, K, d = x.shape
    preds = torch.zeros(n, K, dtype=torch.float64)
    xd, yd = x.double(), y.double()
    for k in range(1, K):
        X, Y = xd[:, :k], yd[:, :k]
        if reg > 0:
            A = X.transpose(1, 2) @ X + reg * torch.eye(d, dtype=torch.float64)
            w = torch.linalg.solve(A, (X.transpose(1, 2) @ Y.unsqueeze(-1))).squeeze(-1)
        else:
            w = (torch.linalg.pinv(X) @ Y.unsqueeze(-1)).squeeze(-1)
        preds[:, k] = (xd[:, k] * w).sum(-1)
    return preds


def ridge_errors(x: Tensor, y: Tensor, noise: float) -> Tensor:
    """Per-prompt squared errors ``(n, K)`` of the Bayes-optimal ridge predictor (module docstring)."""
    d = x.shape[-1]
    return (_prefix_solve(x, y, noise ** 2 * d) - y.double()) ** 2


def least_squares_errors(x: Tensor, y: Tensor) -> Tensor:
    """Per-prompt squared errors ``(n, K)`` of minimum-norm least squares."""
    return (_prefix_solve(x, y, 0.0) - y.double()) ** 2


def dmmse_errors(x: Tensor, y: Tensor, pool: Tensor, noise: float) -> Tensor:
    """Per-prompt squared errors ``(n, K)`` of the posterior mean under the uniform prior on ``pool``."""
    xd, yd, wd = x.double(), y.double(), pool.double()
    n, K, _ = x.shape
    fits = torch.einsum("nkd,md->nkm", xd, wd)                      # (n, K, M): w_m . x_i
    resid2 = (yd.unsqueeze(-1) - fits) ** 2
    cum = torch.cumsum(resid2, dim=1) - resid2                      # sum over pairs before k
    post = torch.softmax(-cum / (2 * noise ** 2), dim=-1)           # (n, K, M)
    pred = (post * fits).sum(-1)
    return (pred - yd) ** 2


def gd_step_lr(n: int, d: int, noise: float) -> float:
    """:math:`\\eta^* = N s^2/(s^2(N+d+1)+\\sigma^2)`, :math:`s^2 = 1/d` (module docstring)."""
    s2 = 1.0 / d
    return n * s2 / (s2 * (n + d + 1) + noise ** 2)


def gd_step_error(eta: float, n: int, d: int, noise: float) -> float:
    """Expected squared error of one GD step with step ``eta`` on ``n`` in-context examples."""
    s2 = 1.0 / d
    return s2 * d * (eta ** 2 * (n + d + 1) / n - 2 * eta + 1) + eta ** 2 * noise ** 2 * d / n + noise ** 2
