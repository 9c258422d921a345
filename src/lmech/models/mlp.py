"""A plain multilayer perceptron with a documented initialization."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "ACTIVATIONS", "get_activation"]


def _quadratic(z: Tensor) -> Tensor:
    return z * z


def _identity(z: Tensor) -> Tensor:
    return z


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "identity": _identity,
    "linear": _identity,
    "quadratic": _quadratic,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function named ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Fully connected network ``x -> W_{L+1} phi(W_L ... phi(W_1 x + b_1) ... + b_L) + b_{L+1}``.

    Args:
        d_in: input features.
        d_out: outputs (logits or regression targets).
        width: hidden width.
        depth: number of hidden layers ``L`` (``depth=0`` is a linear model ``W x + b``).
        activation: ``relu``, ``gelu``, ``tanh``, ``silu``, ``identity`` (alias ``linear``) or
            ``quadratic`` (``z**2``).
        init_scale: multiplies the standard deviation of every weight.
        bias: whether the layers have biases.

    Initialization (standard parameterization): every weight of a layer with fan-in
    ``fan_in`` is drawn iid from ``N(0, init_scale**2 * c / fan_in)``, with ``c = 2`` for the
    hidden layers of a ReLU network (He et al. 2015; a ReLU halves the second moment, so
    ``c = 2`` keeps pre-activation variance constant with depth) and ``c = 1`` otherwise,
    including the readout layer of every network. Biases start at zero. The per-layer ``c`` is
    ``MLP.init_constants`` (tests check the weight std against this formula).

    Shapes: ``forward`` maps ``(..., d_in)`` to ``(..., d_out)``. ``features(x)`` returns the
    ``depth`` post-activation hidden representations, each ``(..., width)``. ``layers`` is the
    ``nn.ModuleList`` of the ``depth + 1`` ``nn.Linear`` maps, the readout last.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = MLP(d_in=194, d_out=97, width=256, depth=2)
        >>> net(torch.randn(8, 194)).shape
        torch.Size([8, 97])
        >>> [h.shape[-1] for h in net.features(torch.randn(8, 194))]
        [256, 256]
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int = 256,
        depth: int = 2,
        activation: str = "relu",
        init_scale: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if min(d_in, d_out) < 1 or (depth > 0 and width < 1):
            raise ValueError("d_in, d_out and width must be positive")
        self.d_in, self.d_out, self.width, self.depth = int(d_in), int(d_out), int(width), int(depth)
        self.activation = activation
        self.init_scale = float(init_scale)
        self._phi = get_activation(activation)
        dims = [d_in] + [width] * depth + [d_out]
        self.layers = nn.ModuleList(
            nn.Linear(fi, fo, bias=bias) for fi, fo in zip(dims[:-1], dims[1:])
        )
        hidden_c = 2.0 if activation == "relu" else 1.0
        self.init_constants: list[float] = [hidden_c] * depth + [1.0]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw weights from ``N(0, init_scale**2 * c / fan_in)`` and zero the biases."""
        with torch.no_grad():
            for layer, c in zip(self.layers, self.init_constants):
                std = self.init_scale * math.sqrt(c / layer.in_features)
                layer.weight.normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias.zero_()

    def features(self, x: Tensor) -> list[Tensor]:
        """Post-activation hidden representations, one ``(..., width)`` tensor per hidden layer."""
        feats = []
        h = x
        for layer in self.layers[:-1]:
            h = self._phi(layer(h))
            feats.append(h)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers[:-1]:
            h = self._phi(layer(h))
        return self.layers[-1](h)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, width={self.width}, depth={self.depth}, "
            f"activation={self.activation!r}, init_scale={self.init_scale}"
        )
