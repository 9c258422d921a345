r"""How :meth:`lmech.optim.PopRiskAdamW.step` runs the update: cut into cache blocks for the
CPU foreach path (:func:`_cache_blocks`), or as one ``torch.compile``-d elementwise kernel per
tensor (``fused=True``, :func:`_fused_update`). Both go through exactly the operations of the
update in the docstring of :mod:`lmech.optim.poprisk`, with the same scalars.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["CPU_BLOCK_ELEMENTS"]

# Elements per cache block of the CPU foreach path: ~10 float32 streams of 2 MiB (state, gradient,
# block-sized temporaries) fit a 32 MiB last-level cache; 2^17 lost to per-call overhead and 2^21 to
# cache misses (``python benchmarks/optimizer_step.py --blocks 17,19,21``).
CPU_BLOCK_ELEMENTS = 1 << 19


def _cache_blocks(lists: tuple[list[Tensor], ...], block: int) -> list[tuple[list[Tensor], ...]]:
    """Cut the aligned tensor lists ``(ps, gs, ms, vs, ss)`` into blocks of at most ``block`` elements.

    A tensor whose five members are all contiguous is cut into flat views (``view(-1)[a:b]``: the
    same memory, so in-place ops on the views update the tensors); any other tensor is one unit,
    whole. Consecutive units are packed into one block while the block stays within ``block``
    elements, so small tensors share one foreach call.
    """
    blocks: list[tuple[list[Tensor], ...]] = []
    cur: tuple[list[Tensor], ...] = tuple([] for _ in lists)
    size = 0
    for members in zip(*lists):
        n = members[0].numel()
        if all(x.is_contiguous() for x in members):
            flat = [x.view(-1) for x in members]
            units = [(a, min(block, n - a)) for a in range(0, n, block)] or [(0, 0)]
            pieces = [[x.narrow(0, a, length) for x in flat] for a, length in units]
        else:
            pieces = [list(members)]
        for piece in pieces:
            length = piece[0].numel()
            if size and size + length > block:
                blocks.append(cur)
                cur, size = tuple([] for _ in lists), 0
            for lst, x in zip(cur, piece):
                lst.append(x)
            size += length
    if cur[0]:
        blocks.append(cur)
    return blocks


def _fused_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor, gate: str, reduction: str,
                  gate_weight_decay: bool) -> None:
    """One tensor's whole update, written for torch.compile (every step-dependent scalar is in ``sc``).

    ``sc`` = [rho, 1-rho, 1-beta1, beta2, 1-beta2, lr*wd, step_size, bc2_sqrt, eps, c, c_hard, lam_soft,
    lam_snr, eps_q, open]. The complements come computed in double (as the foreach path's scalars):
    ``1 - fl(rho)`` in float32 is off by ``u rho / (1 - rho)`` relative (about 100u for rho = 0.99),
    which would bias ``s`` against ``c`` and open every tie of the hard gate at step 1.
    """
    (rho, one_m_rho, one_m_b1, b2, one_m_b2, lr_wd, step_size, bc2_sqrt, eps, c, c_hard, lam_soft, lam_snr,
     eps_q, is_open) = sc.unbind(0)
    diff = g - m
    s.copy_(s * rho + one_m_rho * diff * diff)
    m.copy_(m + one_m_b1 * (g - m))
    v.copy_(v * b2 + one_m_b2 * g * g)
    if reduction == "tensor":
        num = (m * m).sum()
        s_sum = s.sum()
    else:
        num = m * m
        s_sum = s
    if gate == "snr":
        q = num / (num + lam_snr * s_sum + eps_q)
    elif gate == "hard":                                     # d > tau (m^2 + c s): see HARD_TIE_EPS
        d = m * m - c_hard * s
        q = ((d.sum() if reduction == "tensor" else d) > 0).to(m.dtype)
    elif gate == "soft":
        d = (num - c * s_sum).clamp_min(0)
        q = d / (d + lam_soft * s_sum + eps_q)
    else:
        q = torch.ones_like(num)
    q = q + is_open * (1 - q)
    decay = 1 - lr_wd * q if gate_weight_decay else 1 - lr_wd
    p.copy_(p * decay - step_size * q * m / (v.sqrt() / bc2_sqrt + eps))


_COMPILED: Callable | None = None


def _compiled_update() -> Callable:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_fused_update, dynamic=True, fullgraph=True)
    return _COMPILED
