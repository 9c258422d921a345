"""The small 1-D convolutional network of the MNIST-1D paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CNN1D"]


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """MNIST-1D-style 1-D CNN (Greydanus & Kobak 2020; their ``ConvBase``).

    ``(B, in_len)`` (or ``(B, 1, in_len)``) -> unsqueeze a channel ->
    Conv1d(1, C, 5, stride 2, pad 1) -> ReLU -> Conv1d(C, C, 3, stride 2, pad 1) -> ReLU ->
    Conv1d(C, C, 3, stride 2, pad 1) -> ReLU -> flatten -> Linear(C * L3, n_classes).
    For ``in_len=40`` the lengths are 40 -> 19 -> 10 -> 5, so the readout has ``5 C`` inputs;
    with ``channels=32`` there are 8,010 parameters (25 channels, the MNIST-1D repository's
    setting, give 5,210).
    PyTorch's default initialization (Kaiming-uniform with ``a = sqrt(5)``), global RNG.

    ``features(x)`` returns the three post-ReLU feature maps ``(B, C, L_i)``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> CNN1D()(torch.randn(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(self, in_len: int = 40, n_classes: int = 10, channels: int = 32) -> None:
        super().__init__()
        specs = [(1, 5, 2, 1), (channels, 3, 2, 1), (channels, 3, 2, 1)]
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, channels, k, stride=s, padding=p) for c_in, k, s, p in specs
        )
        length = int(in_len)
        for _, k, s, p in specs:
            length = _conv_out(length, k, s, p)
        if length < 1:
            raise ValueError(f"in_len={in_len} is too short for three stride-2 convolutions")
        self.in_len, self.n_classes, self.channels = int(in_len), int(n_classes), int(channels)
        self.out_len = length
        self.linear = nn.Linear(channels * length, n_classes)

    def features(self, x: Tensor) -> list[Tensor]:
        """Post-ReLU feature maps of the three convolutions, each ``(B, channels, L_i)``."""
        h = x.unsqueeze(1) if x.dim() == 2 else x
        feats = []
        for conv in self.convs:
            h = F.relu(conv(h))
            feats.append(h)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1) if x.dim() == 2 else x
        for conv in self.convs:
            h = F.relu(conv(h))
        return self.linear(h.flatten(1))
