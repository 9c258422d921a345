r"""The gate of :class:`lmech.optim.PopRiskAdamW`: its settings (``gate``, ``reduction``,
``alpha``), the per-step scalars in the units of the raw optimizer state, and the gate :math:`q`
itself on lists of tensors (``torch._foreach_*`` ops). Formulas, sources and the decisions on the
open points are in the docstring of :mod:`lmech.optim.poprisk`; the tie rule of the hard gate
next to ``HARD_TIE_EPS`` below.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = ["GATES", "REDUCTIONS", "HARD_TIE_EPS", "resolve_alpha"]

GATES = ("soft", "hard", "snr", "none")
REDUCTIONS = ("element", "tensor")
AlphaSpec = Union[float, str]


def resolve_alpha(alpha: AlphaSpec, batch_size: int | None = None, dataset_size: int | None = None) -> float:
    """The leave-one-out coefficient: a number, ``"fresh"`` (1) or ``"finite"`` (b / (n - b))."""
    if isinstance(alpha, str):
        if alpha == "fresh":
            return 1.0
        if alpha == "finite":
            if batch_size is None or dataset_size is None:
                raise ValueError('alpha="finite" needs batch_size and dataset_size (alpha = b / (n - b)); '
                                 "pass both, or give alpha as a number")
            if not (0 < batch_size < dataset_size):
                raise ValueError(f'alpha="finite" needs 0 < batch_size < dataset_size, got batch_size={batch_size}, '
                                 f"dataset_size={dataset_size} (full-batch training has no leave-one-out noise; "
                                 "use gate='none' or a numeric alpha)")
            return batch_size / (dataset_size - batch_size)
        raise ValueError(f'alpha must be a number, "fresh" or "finite", got {alpha!r}')
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f'alpha must be a finite number >= 0, "fresh" or "finite", got {alpha!r}')
    return float(alpha)


# Ties of the hard gate. At t = 1, m = a g, s = r g^2 and c = a^2 / r (a = 1 - beta1, r = 1 - rho,
# alpha = 1), so d = m^2 - c s is 0 in exact arithmetic and its computed sign is rounding noise. The
# hard gate therefore opens only where d > tau (m^2 + c s), i.e. where m^2 > c_hard s with
# c_hard = c (1 + tau) / (1 - tau); ties within rounding error count as closed.
# Bound (u = eps / 2 of the state's dtype, first order; every op rounds once, scalars computed in
# double and cast once): m = fl(fl(a) g) by lerp, <= 4u (cast u, lerp <= 3u when 1 - beta1 >= 1/2);
# m^2 <= 2*4u + u = 9u; s = fl(r) g g <= 3u; c <= 3u (double) + u (cast) = 4u; c s <= 3u + 4u + u = 8u.
# So a tie computes |d| <= 9u m^2 + 8u c s <= 9u (m^2 + c s) = 4.5 eps (m^2 + c s), and the
# subtraction itself is exact near a tie (Sterbenz). tau = 16 eps leaves a factor 3.5 for the
# second-order terms, for fl(m^2 + c s), and for the sum of reduction="tensor": there the
# elementwise m_k^2 - c_hard s_k are summed (not sum m_k^2 - c_hard sum s_k: its two sums round
# independently, measured 200-600 eps apart at a tie on 1e6 elements), so the summation error is at
# most gamma_n sum_k |m_k^2 - c_hard s_k|, about 2 tau gamma_n c S at a tie, and cannot flip the
# sign of the sum, about -2 tau c S, while gamma_n < 1. The bound is relative: it assumes no
# underflow (float16 squares below 6e-5 are subnormal and can still open a tie).
HARD_TIE_EPS = 16


def _hard_tie_factor(dtype: torch.dtype) -> float:
    """(1 + tau) / (1 - tau), tau = HARD_TIE_EPS * eps(dtype): the hard gate opens iff m^2 > factor * c s."""
    tau = HARD_TIE_EPS * torch.finfo(dtype).eps
    return (1 + tau) / (1 - tau)


class _Scalars:
    """Every per-step scalar of one (group, step count), in the units of the raw state m, v, s.

    The gate is evaluated on raw state: with ``bc1 = 1 - beta1^t`` and ``bcs = 1 - rho^t``,
    ``m_hat^2 - alpha s_hat = (m^2 - c s) / bc1^2`` with ``c = alpha bc1^2 / bcs``; numerator and
    denominator of the soft/snr gates are multiplied by ``bc1^2``. The hard gate compares with
    ``c_hard(dtype) = c (1 + tau) / (1 - tau)`` (ties count as closed; see ``HARD_TIE_EPS``).
    """

    def __init__(self, group: dict, t: int):
        b1, b2 = group["betas"]
        rho, lam = group["rho"], group["softness"]
        self.alpha = resolve_alpha(group["alpha"], group["batch_size"], group["dataset_size"])
        self.bc1 = 1 - b1 ** t
        self.bc2 = 1 - b2 ** t
        self.bcs = 1 - rho ** t
        ratio = self.bc1 ** 2 / self.bcs
        self.c = self.alpha * ratio                          # m^2 - c s  =  bc1^2 (m_hat^2 - alpha s_hat)
        self.lam_soft = lam * ratio                          # soft: lambda s_hat, in raw units
        self.lam_snr = lam * self.alpha * ratio              # snr: lambda alpha s_hat, in raw units
        self.eps_q = group["gate_eps"] * self.bc1 ** 2
        self.open = t <= group["gate_warmup"] or group["gate"] == "none"
        self.step_size = group["lr"] / self.bc1
        self.bc2_sqrt = math.sqrt(self.bc2)

    def c_hard(self, dtype: torch.dtype) -> float:
        """``m^2 - c_hard s > 0``  <=>  ``d > tau (m^2 + c s)`` for state of this dtype."""
        return self.c * _hard_tie_factor(dtype)


def _foreach_gate(ms: list[Tensor], ss: list[Tensor], gate: str, reduction: str, sc: _Scalars) -> list[Tensor]:
    """q for every tensor (new tensors; one per element, or a 0-d tensor per tensor)."""
    if gate == "hard":                                        # q = 1{d > tau (m^2 + c s)}, ties closed
        d = torch._foreach_mul(ms, ms)
        torch._foreach_add_(d, ss, alpha=-sc.c_hard(ms[0].dtype))  # m^2 - c_hard s
        if reduction == "tensor":
            d = [x.sum() for x in d]                          # sum of the differences (see HARD_TIE_EPS)
        torch._foreach_sign_(d)
        torch._foreach_clamp_min_(d, 0.0)
        return d
    if reduction == "tensor":
        norms = torch._foreach_norm(ms, 2)
        num = torch._foreach_mul(norms, norms)               # sum_k m_k^2 per tensor
        s_sum = torch._foreach_norm(ss, 1)                    # sum_k s_k (s >= 0)
    else:
        num = torch._foreach_mul(ms, ms)
        s_sum = ss
    if gate == "snr":
        den = torch._foreach_add(num, s_sum, alpha=sc.lam_snr)
        torch._foreach_add_(den, sc.eps_q)
        torch._foreach_div_(num, den)
        return num
    torch._foreach_add_(num, s_sum, alpha=-sc.c)              # d = m^2 - c s
    torch._foreach_clamp_min_(num, 0.0)                       # soft
    den = torch._foreach_add(num, s_sum, alpha=sc.lam_soft)
    torch._foreach_add_(den, sc.eps_q)
    torch._foreach_div_(num, den)
    return num


def _state_gates(group: dict, sc: _Scalars, ms: list[Tensor], ss: list[Tensor]) -> list[Tensor]:
    """The gates a step with these scalars applies (ones while the gate is held open)."""
    if sc.open:
        if group["reduction"] == "tensor":
            return [torch.ones((), dtype=m.dtype, device=m.device) for m in ms]
        return [torch.ones_like(m) for m in ms]
    return _foreach_gate(ms, ss, group["gate"], group["reduction"], sc)
