r"""Grokfast-EMA: amplify the slow component of each parameter's gradient, then step any optimizer.

Source: Lee, Kang, Kim, Kim & Kim, *Grokfast: Accelerated Grokking by Amplifying Slow Gradients*
(arXiv 2405.20233, 2024), ``gradfilter_ema`` in github.com/ironjr/grokfast. Per parameter, with
the raw minibatch gradient :math:`g_t`,

.. math::

    \bar g_t = \alpha\,\bar g_{t-1} + (1-\alpha)\,g_t \quad(\bar g_1 = g_1), \qquad
    g_t \leftarrow g_t + \lambda\,\bar g_t,

and the wrapped optimizer steps on the filtered gradient. Defaults :math:`\alpha = 0.98`,
:math:`\lambda = 2` (the paper's). The first step therefore uses :math:`(1+\lambda) g_1`, as in the
reference code (its EMA starts at the first gradient). The filter works in place on ``p.grad``.

:class:`Grokfast` wraps an optimizer instance and shares its ``param_groups`` (learning-rate
schedulers and ``zero_grad`` act on the wrapped optimizer); ``state`` holds the filter's EMA
(``grokfast_ema``); ``state_dict()`` holds both the wrapped optimizer's and the filter's state.

Example:
    >>> import torch
    >>> from lmech.optim import Grokfast
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0), alpha=0.98, lamb=2.0)
    >>> model(torch.randn(8, 4)).sum().backward()
    >>> opt.step()
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    >>> opt.optimizer.param_groups[0]["lr"]
    0.0005
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["Grokfast"]


class Grokfast(torch.optim.Optimizer):
    """Grokfast-EMA gradient filter in front of ``optimizer`` (see the module docstring).

    Args:
        optimizer: the optimizer to step after filtering (e.g. ``torch.optim.AdamW``).
        alpha: EMA momentum :math:`\\alpha \\in [0, 1)`.
        lamb: amplification :math:`\\lambda \\ge 0` (``lamb=0`` steps ``optimizer`` unchanged).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.98, lamb: float = 2.0):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Grokfast wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not 0 <= alpha < 1:
            raise ValueError(f"Grokfast alpha must be in [0, 1), got {alpha}")
        if not lamb >= 0:
            raise ValueError(f"Grokfast lamb must be >= 0, got {lamb}")
        self.optimizer = optimizer
        # The wrapped optimizer's group dicts are adopted as they are (not copied), so that changes
        # to lr made through either object are seen by both.
        super().__init__(optimizer.param_groups, dict(grokfast_alpha=alpha, grokfast_lamb=lamb))

    def add_param_group(self, param_group: dict) -> None:
        if not any(param_group is g for g in self.optimizer.param_groups):
            raise ValueError("add the group to the wrapped optimizer first: Grokfast(...).optimizer.add_param_group(g),"
                             " then Grokfast.add_param_group(the same dict)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def filter_gradients(self) -> None:
        """Apply the filter to every ``p.grad`` in place (``step`` calls it first)."""
        for group in self.param_groups:
            alpha, lamb = group["grokfast_alpha"], group["grokfast_lamb"]
            grads, emas = [], []               # every parameter with a gradient
            seen_grads, seen_emas = [], []     # those whose EMA already exists
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Grokfast does not support sparse gradients; use dense gradients")
                state = self.state[p]
                if "grokfast_ema" in state:
                    seen_grads.append(p.grad)
                    seen_emas.append(state["grokfast_ema"])
                else:
                    state["grokfast_ema"] = p.grad.detach().clone()   # EMA starts at the first gradient
                grads.append(p.grad)
                emas.append(state["grokfast_ema"])
            if seen_grads:
                torch._foreach_lerp_(seen_emas, seen_grads, 1 - alpha)
            if grads:
                torch._foreach_add_(grads, emas, alpha=lamb)

    def step(self, closure: Callable[[], Any] | None = None):
        """Filter the gradients, then ``optimizer.step()``; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.filter_gradients()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "grokfast": super().state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"optimizer", "grokfast"}:
            raise ValueError("not a Grokfast state_dict: expected keys 'optimizer' and 'grokfast'")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        saved = state_dict["grokfast"]
        params = [p for g in self.param_groups for p in g["params"]]
        index = [i for g in saved["param_groups"] for i in g["params"]]
        if len(index) != len(params):
            raise ValueError(f"Grokfast state_dict has {len(index)} parameters, this optimizer {len(params)}")
        for g, s in zip(self.param_groups, saved["param_groups"]):
            g["grokfast_alpha"], g["grokfast_lamb"] = s["grokfast_alpha"], s["grokfast_lamb"]
        self.state.clear()
        for i, p in zip(index, params):
            if i in saved["state"]:
                self.state[p] = {"grokfast_ema": saved["state"][i]["grokfast_ema"].to(p.device, p.dtype).clone()}
