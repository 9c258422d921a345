"""Optimizers: a registry used by the experiments (``build_optimizer``)."""

from __future__ import annotations

from typing import Iterable

import torch

from lmech.optim.grokfast import Grokfast
from lmech.optim.poprisk import PopRiskAdamW

OPTIMIZERS = ("adamw", "adam", "sgd", "poprisk", "grokfast")
POPRISK_KEYS = ("gate", "softness", "alpha", "rho", "reduction", "gate_eps", "gate_warmup", "gate_weight_decay",
                "fused", "eps")
GROKFAST_KEYS = ("grokfast_alpha", "grokfast_lamb")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.0, *,
                    batch_size: int | None = None, dataset_size: int | None = None,
                    **extra) -> torch.optim.Optimizer:
    """An optimizer by name. ``adamw``/``adam`` use the multi-tensor (foreach) path.

    ``poprisk`` is :class:`PopRiskAdamW` (``extra`` may hold ``POPRISK_KEYS``; ``batch_size`` and
    ``dataset_size`` feed ``alpha="finite"``); ``grokfast`` is :class:`Grokfast` around AdamW
    (``extra``: ``grokfast_alpha``, ``grokfast_lamb``).
    """
    params = list(params)
    if name == "poprisk":
        _check_extra(name, extra, POPRISK_KEYS)
        return PopRiskAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, batch_size=batch_size,
                            dataset_size=dataset_size, **extra)
    if name == "grokfast":
        _check_extra(name, extra, GROKFAST_KEYS)
        inner = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
        return Grokfast(inner, alpha=extra.get("grokfast_alpha", 0.98), lamb=extra.get("grokfast_lamb", 2.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def _check_extra(name: str, extra: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for optimizer {name!r}; known: {', '.join(known)}")


__all__ = ["OPTIMIZERS", "Grokfast", "PopRiskAdamW", "build_optimizer"]
