r"""Exact mode of :class:`lmech.optim.PopRiskAdamW`: the leave-one-out noise term
:math:`\Sigma_B/(b-1)` from per-example gradients, and how well the optimizer's streaming proxy
:math:`\hat s` tracks it on a real run (docstring of :mod:`lmech.optim.poprisk`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from lmech.optim.poprisk_gate import _Scalars

if TYPE_CHECKING:
    from lmech.optim.poprisk import PopRiskAdamW

__all__ = ["leave_one_out_term", "batch_noise", "compare_noise_proxy"]


def leave_one_out_term(per_example: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Batch mean :math:`\bar g` and leave-one-out noise :math:`\Sigma_B/(b-1)`, per coordinate.

    ``per_example[name]`` has shape ``(b, *param.shape)``. With the paper's (biased) normalization
    :math:`\Sigma_B = \frac1b\sum_i (g_i - \bar g)^2`,

    .. math:: \bar g^2 - \frac{\Sigma_B}{b-1} = \frac{1}{b(b-1)}\sum_{i\ne j} g_i g_j,

    the unbiased U-statistic for :math:`\mu^2` (each example scored against the other
    :math:`b-1`), and :math:`\mathbb E[\Sigma_B/(b-1)] = \mathrm{Var}(\bar g)` for i.i.d. examples.

    Example:
        >>> g = {"w": torch.tensor([[1.0], [3.0]])}
        >>> mean, loo = leave_one_out_term(g)
        >>> mean["w"].item(), loo["w"].item()          # Sigma_B = 1, b - 1 = 1
        (2.0, 1.0)
    """
    means, loos = {}, {}
    for name, g in per_example.items():
        b = g.shape[0]
        if b < 2:
            raise ValueError(f"the leave-one-out term needs at least 2 examples per batch, got {b} for {name!r}")
        mean = g.mean(0)
        means[name] = mean
        loos[name] = (g - mean).square().mean(0) / (b - 1)
    return means, loos


def batch_noise(model, loss_fn: Callable, inputs, targets, params=None, chunk_size: int | None = None,
                **kwargs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r""":func:`leave_one_out_term` of the per-example gradients of ``model`` on one batch.

    Per-example gradients come from :func:`lmech.core.per_example_grads` (``loss_fn`` is the
    training loss evaluated on a batch of one, so with a ``mean`` loss :math:`\bar g` is the
    minibatch gradient the optimizer sees). ``kwargs`` go to ``per_example_grads`` (``max_bytes``).
    Returns ``({name: g_bar}, {name: Sigma_B / (b - 1)})``.
    """
    from lmech.core import per_example_grads

    grads = per_example_grads(model, loss_fn, inputs, targets, params=params, chunk_size=chunk_size, **kwargs)
    return leave_one_out_term(grads)


@torch.no_grad()
def compare_noise_proxy(optimizer: PopRiskAdamW, model: torch.nn.Module, loss_fn: Callable, inputs, targets, params=None,
                        chunk_size: int | None = None, **kwargs) -> dict[str, float]:
    r"""How well the EMA proxy :math:`\hat s` tracks the exact :math:`\Sigma_B/(b-1)` on a batch.

    Computes the exact term at the current weights on ``(inputs, targets)`` (a fresh batch of the
    training size) and compares, over every coordinate of the selected parameters that the
    optimizer holds state for:

    * ``noise_ratio`` :math:`= \sum_k \hat s_k / \sum_k \Sigma_{B,k}/(b-1)` (1 = unbiased;
      about :math:`2/(1+\beta_1)` expected for stationary gradients, more when the mean drifts);
    * ``median_ratio``: median over coordinates of :math:`\hat s_k / (\Sigma_{B,k}/(b-1))`;
    * ``log_corr``: Pearson correlation of :math:`\log \hat s_k` and :math:`\log \Sigma_{B,k}/(b-1)`;
    * ``gate_agreement``: fraction of coordinates where :math:`\mathbf 1\{\hat m^2 > \alpha\hat s\}`
      equals :math:`\mathbf 1\{\bar g^2 > \alpha\Sigma_B/(b-1)\}`;
    * ``pop_descent_proxy`` :math:`= \sum_k(\hat m_k^2-\alpha\hat s_k)_+` and
      ``pop_descent_exact`` :math:`= \sum_k(\bar g_k^2-\alpha\Sigma_{B,k}/(b-1))_+`;
    * ``n_coords``: coordinates compared.
    """
    with torch.enable_grad():
        means, loos = batch_noise(model, loss_fn, inputs, targets, params=params, chunk_size=chunk_size, **kwargs)
    named = dict(model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    s_hat, exact, m_hat, g_bar, alphas = [], [], [], [], []
    for name in means:
        p = named[name]
        state = optimizer.state.get(p)
        if not state or id(p) not in group_of:
            continue
        group = group_of[id(p)]
        t = int(state["step"].item())
        sc = _Scalars(group, t)
        s_hat.append((state["exp_var"] / sc.bcs).flatten().double())
        m_hat.append((state["exp_avg"] / sc.bc1).flatten().double())
        exact.append(loos[name].flatten().double())
        g_bar.append(means[name].flatten().double())
        alphas.append(torch.full_like(s_hat[-1], sc.alpha))
    if not s_hat:
        raise ValueError("no selected parameter has optimizer state: take at least one optimizer step first, "
                         "and pass the model whose parameters the optimizer holds")
    s_hat, exact, m_hat, g_bar, alpha = (torch.cat(x) for x in (s_hat, exact, m_hat, g_bar, alphas))
    both = (s_hat > 0) & (exact > 0)
    log_s, log_e = s_hat[both].log(), exact[both].log()
    corr = torch.corrcoef(torch.stack([log_s, log_e]))[0, 1] if both.sum() > 1 else torch.tensor(float("nan"))
    return dict(
        noise_ratio=float(s_hat.sum() / exact.sum()),
        median_ratio=float((s_hat[both] / exact[both]).median()) if both.any() else float("nan"),
        log_corr=float(corr),
        gate_agreement=float(((m_hat.square() > alpha * s_hat) == (g_bar.square() > alpha * exact)).double().mean()),
        pop_descent_proxy=float((m_hat.square() - alpha * s_hat).clamp_min(0).sum()),
        pop_descent_exact=float((g_bar.square() - alpha * exact).clamp_min(0).sum()),
        n_coords=int(s_hat.numel()),
    )
