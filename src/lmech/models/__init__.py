"""Small reference models.

=================  ================================================================
``mlp``            :class:`MLP`, fully connected, documented init, ``features()``
``deep-linear``    :class:`DeepLinear`, product of bias-free linear maps (Saxe et al.)
``transformer``    :class:`Transformer`, small causal pre-LN transformer on tokens
``cnn1d``          :class:`CNN1D`, the MNIST-1D convolutional network
=================  ================================================================

Every model draws its initialization from torch's global RNG, so ``torch.manual_seed(s)``
before construction makes it deterministic.

Example:
    >>> from lmech.models import build_model
    >>> net = build_model("mlp", d_in=64, d_out=10, width=128, depth=2)
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .cnn1d import CNN1D
from .deep_linear import DeepLinear
from .mlp import ACTIVATIONS, MLP
from .transformer import Transformer, transformer_num_params

__all__ = [
    "MLP",
    "DeepLinear",
    "Transformer",
    "CNN1D",
    "ACTIVATIONS",
    "MODELS",
    "build_model",
    "transformer_num_params",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "deep-linear": DeepLinear,
    "transformer": Transformer,
    "cnn1d": CNN1D,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the model registered as ``name`` (see ``MODELS``) with ``kwargs``.

    Underscores and hyphens are interchangeable (``"deep_linear"`` == ``"deep-linear"``).
    Raises ValueError listing the valid names for an unknown name.

    Example:
        >>> build_model("transformer", vocab_size=99, seq_len=4, n_out=97).output
        'last'
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[key](**kwargs)
