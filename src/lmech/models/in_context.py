"""Models that read a prompt of (x, y) pairs: a small causal transformer on continuous tokens and a
one-layer linear self-attention (used by the ``in-context`` catalog entry)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmech.models.transformer import Block

__all__ = ["InContextTransformer", "LinearSelfAttention"]


class InContextTransformer(nn.Module):
    """Causal pre-LN transformer on the sequence ``x_1, y_1, x_2, y_2, ...`` (Garg et al. 2022).

    Token ``2i`` is ``(x_i, 0)`` and token ``2i+1`` is ``(0, ..., 0, y_i)`` in ``R^{d+1}``; a linear
    read-in, learned positions, ``n_layers`` blocks of :class:`lmech.models.transformer.Block`
    (causal attention, GELU MLP of width ``4 * width``), a final LayerNorm and a linear read-out.
    The output at token ``2i`` (which sees the first ``i`` pairs and ``x_i``) is the prediction of
    ``y_i``.

    Input ``x (B, K, d)``, ``y (B, K)``; output ``(B, K)``.

    Example:
        >>> net = InContextTransformer(d=3, max_pairs=5, width=16, n_layers=1, n_heads=2)
        >>> net(torch.randn(2, 5, 3), torch.randn(2, 5)).shape
        torch.Size([2, 5])
    """

    def __init__(self, d: int, max_pairs: int, width: int = 64, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.d = int(d)
        self.read_in = nn.Linear(d + 1, width)
        self.pos = nn.Parameter(torch.randn(2 * max_pairs, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, n_heads, 4 * width, True, 0.0) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.read_out = nn.Linear(width, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        b, k, d = x.shape
        # tokens x_1, y_1, x_2, ...: (x_i, 0) and (0, y_i), interleaved out of place (vmap-able)
        x_tokens = torch.cat([x, x.new_zeros(b, k, 1)], -1)
        y_tokens = torch.cat([y.new_zeros(b, k, d), y.unsqueeze(-1)], -1)
        tokens = torch.stack([x_tokens, y_tokens], 2).reshape(b, 2 * k, d + 1)
        h = self.read_in(tokens) + self.pos[: 2 * k]
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.ln_f(h[:, 0::2])).squeeze(-1)


class LinearSelfAttention(nn.Module):
    r"""One layer of linear self-attention read at a query token (von Oswald et al. 2023).

    Tokens :math:`e_i = (x_i, y_i)`, query :math:`e_q = (x_q, 0)`;
    :math:`\hat y = \big[W_{PV}\,\frac1N\sum_i e_i e_i^\top\, W_{KQ}\, e_q\big]_{d+1}` with full
    matrices :math:`W_{KQ}, W_{PV} \in \mathbb R^{(d+1)\times(d+1)}` (the products
    :math:`W_K^\top W_Q` and :math:`W_P W_V`), initialized :math:`\mathcal N(0, \text{init}^2)`.
    :meth:`effective_lr` returns the matrix :math:`A \in \mathbb R^{d\times d}` with
    :math:`\hat y = x_q^\top A^\top \frac1N\sum_i y_ix_i + \ldots` (the part that is one step of
    preconditioned GD): :math:`A = (W_{PV})_{d+1,d+1}\,(W_{KQ})_{1:d,1:d}`.

    Input ``x (B, N, d)``, ``y (B, N)``, ``xq (B, d)``; output ``(B,)``.
    """

    def __init__(self, d: int, init: float = 0.01):
        super().__init__()
        self.d = int(d)
        self.w_kq = nn.Parameter(torch.randn(d + 1, d + 1) * init)
        self.w_pv = nn.Parameter(torch.randn(d + 1, d + 1) * init)

    def forward(self, x: Tensor, y: Tensor, xq: Tensor) -> Tensor:
        e = torch.cat([x, y.unsqueeze(-1)], dim=-1)                      # (B, N, d+1)
        eq = torch.cat([xq, torch.zeros_like(xq[:, :1])], dim=-1)        # (B, d+1)
        gram = e.transpose(1, 2) @ e / e.shape[1]                        # (B, d+1, d+1)
        out = (self.w_pv[-1] @ gram) @ self.w_kq                         # (B, d+1) row: p^T Gamma W_KQ
        return (out * eq).sum(-1)

    def effective_lr(self) -> Tensor:
        return self.w_pv[-1, -1] * self.w_kq[: self.d, : self.d]
