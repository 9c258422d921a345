r"""Direct Preference Optimization (Rafailov et al. 2023, *Direct Preference Optimization: Your
Language Model is Secretly a Reward Model*, eq. 7).

For a prompt :math:`x`, a preferred response :math:`y_w` and a dispreferred :math:`y_l`, a policy
:math:`\pi_\theta` and a frozen reference :math:`\pi_\text{ref}`, the implicit reward is
:math:`\hat r(x, y) = \beta\,(\log\pi_\theta(y|x) - \log\pi_\text{ref}(y|x))` and the loss

.. math:: \mathcal L_\text{DPO} = -\,\mathbb E\,\log\sigma\big(\hat r(x, y_w) - \hat r(x, y_l)\big),

with :math:`\log\pi(y|x) = \sum_t \log\pi(y_t|x, y_{<t})` summed over the response tokens. At
:math:`\pi_\theta = \pi_\text{ref}` the loss is :math:`\log 2` whatever :math:`\beta`. Computed with
``F.logsigmoid`` (stable for large margins).

Example:
    >>> import torch
    >>> z = torch.zeros(3)
    >>> round(float(dpo_loss(z, z, z, z, beta=0.1).loss), 6)      # policy == reference: log 2
    0.693147
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmech.errors import ConfigError

__all__ = ["DPOOutput", "dpo_loss", "sequence_logprob"]


@dataclass
class DPOOutput:
    """``loss`` (scalar, mean over pairs); per pair ``chosen_reward``, ``rejected_reward`` (the
    implicit rewards :math:`\\hat r`, detached) and ``margin`` = their difference (detached)."""

    loss: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    margin: Tensor


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> DPOOutput:
    """DPO loss from sequence log-probabilities ``(B,)`` of the chosen and rejected responses under
    the policy and the reference (see the module docstring); ``beta > 0``."""
    if not beta > 0:
        raise ConfigError(f"beta must be positive, got {beta}")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ConfigError(f"the four log-probability tensors must have one shape, got {sorted(map(tuple, shapes))}")
    chosen = beta * (policy_chosen - ref_chosen.detach())
    rejected = beta * (policy_rejected - ref_rejected.detach())
    logits = chosen - rejected
    return DPOOutput(loss=-F.logsigmoid(logits).mean(), chosen_reward=chosen.detach(),
                     rejected_reward=rejected.detach(), margin=logits.detach())


def sequence_logprob(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`\sum_t m_t \log\mathrm{softmax}(\text{logits}_t)[y_t]`: ``logits`` ``(B, T, V)`` predicting
    ``targets`` ``(B, T)`` (int), ``mask`` ``(B, T)`` (default all ones) selects the response tokens;
    returns ``(B,)``."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ConfigError(f"logits must be (B, T, V) and targets (B, T); got {tuple(logits.shape)}, "
                          f"{tuple(targets.shape)}")
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if mask is not None:
        lp = lp * mask.to(lp.dtype)
    return lp.sum(-1)
