"""Optimizers: a registry used by the experiments (``build_optimizer``)."""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.0, **extra) -> torch.optim.Optimizer:
    """An optimizer by name. ``adamw``/``adam`` use the multi-tensor (foreach) path."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "build_optimizer"]
