"""A small decoder-only (causal) transformer, as used in the grokking literature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Transformer", "transformer_num_params"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``(B, T, d_model) -> (B, T, d_model)``.

    ``softmax(Q K^T / sqrt(d_head) + causal mask) V`` per head, via
    ``F.scaled_dot_product_attention(is_causal=True)``: position ``t`` attends to ``0..t``.
    ``scale`` (default ``None`` = ``1/sqrt(d_head)``) replaces the logit scale; muP sets it to
    ``sqrt(base_d_head) / d_head`` (:mod:`lmech.mup`).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = float(dropout)
        self.resid_drop = nn.Dropout(dropout)
        self.scale: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, self.d_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True, scale=self.scale
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))

    def forward_last(self, x: Tensor) -> Tensor:
        """The output at the last position only, ``(B, T, d_model) -> (B, d_model)``.

        Equal to ``forward(x)[:, -1]``: the last query attends to every position (no mask needed),
        so only its row of attention, and its output projection, is computed.
        """
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q[:, -1:].view(b, 1, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, 1, d_head)
        k, v = (z.view(b, t, self.n_heads, self.d_head).transpose(1, 2) for z in (k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=False, scale=self.scale
        )
        return self.resid_drop(self.proj(y.reshape(b, d)))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, layer_norm: bool, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.ln2(x)))))

    def forward_last(self, x: Tensor) -> Tensor:
        """``forward(x)[:, -1]``, ``(B, T, d_model) -> (B, d_model)``, without the other positions' MLP."""
        x = x[:, -1] + self.attn.forward_last(self.ln1(x))
        return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.ln2(x)))))


def transformer_num_params(
    vocab_size: int,
    seq_len: int,
    n_out: int,
    d_model: int = 128,
    n_layers: int = 2,
    d_mlp: int = 512,
    layer_norm: bool = True,
) -> int:
    """Closed-form parameter count of :class:`Transformer` (all weights and biases).

    ``(V + T) d`` embeddings, per layer ``4 d^2 + 4 d`` attention + ``2 d m + m + d`` MLP
    (+ ``4 d`` for the two LayerNorms), final LayerNorm ``2 d``, unembedding ``d n_out + n_out``.
    """
    d, m = d_model, d_mlp
    ln = 2 * d if layer_norm else 0
    per_layer = (4 * d * d + 4 * d) + (2 * d * m + m + d) + 2 * ln
    return (vocab_size + seq_len) * d + n_layers * per_layer + ln + d * n_out + n_out


class Transformer(nn.Module):
    """Decoder-only transformer on integer tokens with a classification/regression head.

    Architecture (GPT-2 style, pre-LN): token embedding + learned positional embedding
    -> ``n_layers`` blocks of [LN -> causal multi-head self-attention -> residual add,
    LN -> Linear(d_model, d_mlp) -> GELU -> Linear(d_mlp, d_model) -> residual add]
    -> final LN -> unembedding ``Linear(d_model, n_out)``. ``layer_norm=False`` replaces every
    LayerNorm by the identity (as in Nanda et al. 2023's grokking model).

    Args:
        vocab_size: number of token ids (e.g. ``p + 2`` for modular arithmetic).
        seq_len: maximum sequence length (positional embeddings).
        n_out: output width (e.g. ``p`` classes).
        d_model, n_heads, n_layers, d_mlp: sizes; ``d_model % n_heads == 0``.
        layer_norm: use LayerNorm (pre-LN and final) or not.
        dropout: dropout on attention weights, residual branches and embeddings (train mode).
        output: ``"last"`` -> logits at the last position ``(B, n_out)``; ``"all"`` ->
            ``(B, T, n_out)`` at every position.

    Input: int64 tokens ``(B, T)`` with ``T <= seq_len``. Position ``t``'s output depends only on
    tokens ``0..t`` (causal).

    Initialization (nanoGPT / GPT-2): Linear and Embedding weights ``N(0, 0.02**2)``, the
    residual output projections (``attn.proj``, ``fc_out``) ``N(0, (0.02 / sqrt(2 n_layers))**2)``,
    biases zero, LayerNorm weight 1 and bias 0. Draws use torch's global RNG.

    Parameter count (:func:`transformer_num_params`): with the defaults, ``vocab_size=99``,
    ``seq_len=4``, ``n_out=97`` it is 422,497 (about 0.42 M): embeddings 13,184, two blocks of
    198,272, final LN 256, unembedding 12,513.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = Transformer(vocab_size=99, seq_len=4, n_out=97)
        >>> tokens = torch.randint(0, 99, (8, 4))
        >>> net(tokens).shape, Transformer(99, 4, 97, output="all")(tokens).shape
        (torch.Size([8, 97]), torch.Size([8, 4, 97]))
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_out: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        d_mlp: int = 512,
        layer_norm: bool = True,
        dropout: float = 0.0,
        output: str = "last",
    ) -> None:
        super().__init__()
        if output not in ("last", "all"):
            raise ValueError(f"output must be 'last' or 'all', got {output!r}")
        if min(vocab_size, seq_len, n_out, d_model, n_heads, d_mlp) < 1 or n_layers < 0:
            raise ValueError("sizes must be positive (n_layers >= 0)")
        self.vocab_size, self.seq_len, self.n_out = int(vocab_size), int(seq_len), int(n_out)
        self.d_model, self.n_layers = int(d_model), int(n_layers)
        self.output = output
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_mlp, layer_norm, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.unembed = nn.Linear(d_model, n_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw all parameters with the documented (nanoGPT) initialization."""
        resid_std = 0.02 / math.sqrt(2 * max(self.n_layers, 1))
        with torch.no_grad():
            for name, mod in self.named_modules():
                if isinstance(mod, nn.Linear):
                    std = resid_std if name.endswith(("attn.proj", "fc_out")) else 0.02
                    mod.weight.normal_(0.0, std)
                    if mod.bias is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.Embedding):
                    mod.weight.normal_(0.0, 0.02)
                elif isinstance(mod, nn.LayerNorm):
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()

    def _embed(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"expected int tokens of shape (B, T), got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.seq_len}")
        pos = torch.arange(t, device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos))

    def features(self, tokens: Tensor) -> list[Tensor]:
        """Residual stream after the embedding and after each block: ``n_layers + 1`` tensors ``(B, T, d_model)``."""
        h = self._embed(tokens)
        feats = [h]
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return feats

    def forward(self, tokens: Tensor) -> Tensor:
        h = self._embed(tokens)
        if self.output == "all" or not self.blocks:
            for block in self.blocks:
                h = block(h)
            return self.unembed(self.ln_f(h if self.output == "all" else h[:, -1]))
        # output="last": the last block's MLP and projections run at the last position only (its other
        # positions reach no output); about 28% fewer FLOPs for the grokking model (T = 4)
        for block in self.blocks[:-1]:
            h = block(h)
        return self.unembed(self.ln_f(self.blocks[-1].forward_last(h)))

    def extra_repr(self) -> str:
        return f"output={self.output!r}"
