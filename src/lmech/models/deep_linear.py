"""Deep linear network: the solvable model of Saxe, McClelland & Ganguli (2014)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DeepLinear"]


def _random_orthogonal(n: int) -> Tensor:
    """Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian with sign correction), global RNG."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class DeepLinear(nn.Module):
    """Product of ``depth`` bias-free linear maps: ``f(x) = W_L ... W_2 W_1 x``.

    Dimensions: ``W_1`` is ``(width, d_in)``, ``W_2 .. W_{L-1}`` are ``(width, width)`` and
    ``W_L`` is ``(d_out, width)``; ``depth=1`` is the single map ``W_1`` of shape
    ``(d_out, d_in)``. No nonlinearity, no biases; the network computes a linear function but
    its gradient dynamics are nonlinear (saddle-to-saddle, stage-like learning).

    Initializations (``init``):

    - ``"gaussian"`` (default): every entry iid ``N(0, init_scale**2)``, *not* scaled by
      fan-in. The default ``init_scale=1e-3`` is the small-initialization regime in which Saxe
      et al.'s sigmoidal, one-mode-at-a-time learning appears.
    - ``"balanced"``: exactly balanced, ``W_{l+1}^T W_{l+1} = W_l W_l^T`` for every ``l``.
      With Haar-random orthogonal ``U_l`` of size ``n_l`` (``n_0 = d_in``, ``n_L = d_out``)
      and ``r = min(d_in, width, d_out)``, ``W_l = init_scale * U_l [I_r 0] U_{l-1}^T``. Each
      ``W_l`` has ``r`` singular values equal to ``init_scale``, and the end-to-end map
      ``init_scale**depth * U_L [I_r 0] U_0^T`` has ``r`` singular values
      ``init_scale**depth``. Balancedness is conserved by gradient flow (Arora et al. 2018).

    ``layers`` is the ``nn.ModuleList`` of the ``nn.Linear`` maps (first first); ``weights()``
    their matrices; ``end_to_end()`` the product ``W_L ... W_1`` of shape ``(d_out, d_in)``.
    ``forward`` maps ``(..., d_in)`` to ``(..., d_out)``. Random draws use torch's global RNG,
    so ``torch.manual_seed`` makes construction deterministic.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = DeepLinear(d_in=8, d_out=4, width=16, depth=3, init_scale=1e-2)
        >>> net.end_to_end().shape
        torch.Size([4, 8])
        >>> x = torch.randn(5, 8)
        >>> torch.allclose(net(x), x @ net.end_to_end().T, atol=1e-9)
        True
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        depth: int,
        init_scale: float = 1e-3,
        init: str = "gaussian",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if min(d_in, d_out, width) < 1:
            raise ValueError("d_in, d_out and width must be positive")
        if init not in ("gaussian", "balanced"):
            raise ValueError(f"init must be 'gaussian' or 'balanced', got {init!r}")
        self.d_in, self.d_out, self.width, self.depth = int(d_in), int(d_out), int(width), int(depth)
        self.init_scale = float(init_scale)
        self.init = init
        self.dims = [self.d_in] + [self.width] * (self.depth - 1) + [self.d_out]
        self.layers = nn.ModuleList(
            nn.Linear(fi, fo, bias=False) for fi, fo in zip(self.dims[:-1], self.dims[1:])
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw the weights with the configured ``init`` and ``init_scale``."""
        with torch.no_grad():
            if self.init == "gaussian":
                for layer in self.layers:
                    layer.weight.normal_(0.0, self.init_scale)
                return
            r = min(self.dims)
            us = [_random_orthogonal(n) for n in self.dims]
            for l, layer in enumerate(self.layers):
                w = self.init_scale * us[l + 1][:, :r] @ us[l][:, :r].T
                layer.weight.copy_(w.to(layer.weight.dtype))

    def weights(self) -> list[Tensor]:
        """The weight matrices ``[W_1, ..., W_L]`` (first layer first)."""
        return [layer.weight for layer in self.layers]

    def end_to_end(self) -> Tensor:
        """The end-to-end matrix ``W = W_L ... W_1`` of shape ``(d_out, d_in)``."""
        w = self.layers[0].weight
        for layer in self.layers[1:]:
            w = layer.weight @ w
        return w

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, width={self.width}, depth={self.depth}, "
            f"init={self.init!r}, init_scale={self.init_scale}"
        )
