"""Config keys shared by the experiments that compare optimizers (PopRiskAdamW, Grokfast, AdamW).

An experiment config inherits :class:`OptimizerKeys` (or declares the same fields) and builds its
optimizer with ``build_optimizer(cfg.optimizer, params, lr=..., weight_decay=..., betas=...,
**optimizer_options(cfg, batch_size, dataset_size))``; after each evaluation it logs
:func:`optimizer_diagnostics` (the gate statistics of :class:`lmech.optim.PopRiskAdamW`; empty
for other optimizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from lmech.experiments.base import require

DIAGNOSTIC_KEYS = ("gate_mean", "gate_closed_fraction", "pop_descent")


@dataclass
class OptimizerKeys:
    """``optimizer`` and the PopRiskAdamW / Grokfast hyperparameters (see :mod:`lmech.optim`)."""

    optimizer: Literal["adamw", "adam", "sgd", "poprisk", "grokfast"] = "adamw"  # which optimizer (lmech.optim)
    gate: Literal["soft", "hard", "snr", "none"] = "soft"  # PopRiskAdamW's gate
    alpha: Union[float, Literal["fresh", "finite"]] = "fresh"  # leave-one-out weight: a number, 1, or b/(n-b)
    softness: float = 1.0                                  # the gate's lambda
    rho: float = 0.99                                      # EMA rate of the gradient-variance estimate
    gate_warmup: int = 0                                   # steps with the gate held open
    gate_weight_decay: bool = False                        # multiply the weight decay by the gate
    reduction: Literal["element", "tensor"] = "element"   # one gate per element or per tensor
    grokfast_alpha: float = 0.98                           # Grokfast's gradient EMA rate
    grokfast_lamb: float = 2.0                             # Grokfast's amplification


def validate_optimizer_keys(cfg, batch_size: int, dataset_size: int | None) -> None:
    """ConfigError for bad optimizer keys; ``dataset_size=None`` means fresh data every step."""
    if cfg.optimizer == "poprisk":
        if cfg.alpha == "finite":
            require(dataset_size is not None,
                    "alpha=finite needs a finite training set; this configuration draws fresh data every step "
                    "(use alpha=fresh or a number)")
            require(batch_size < dataset_size, f"alpha=finite needs batch_size < the training-set size "
                    f"({dataset_size}); lower batch_size or give alpha a number")
        require(isinstance(cfg.alpha, str) or cfg.alpha >= 0, f"alpha must be >= 0, got {cfg.alpha}")
        require(cfg.softness >= 0, f"softness must be >= 0, got {cfg.softness}")
        require(0 <= cfg.rho < 1, f"rho must be in [0, 1), got {cfg.rho}")
        require(cfg.gate_warmup >= 0, f"gate_warmup must be >= 0, got {cfg.gate_warmup}")
    require(0 <= cfg.grokfast_alpha < 1, f"grokfast_alpha must be in [0, 1), got {cfg.grokfast_alpha}")
    require(cfg.grokfast_lamb >= 0, f"grokfast_lamb must be >= 0, got {cfg.grokfast_lamb}")


def optimizer_options(cfg, batch_size: int, dataset_size: int | None) -> dict:
    """The extra ``build_optimizer`` keywords for ``cfg.optimizer``."""
    if cfg.optimizer == "poprisk":
        return dict(gate=cfg.gate, alpha=cfg.alpha, softness=cfg.softness, rho=cfg.rho, gate_warmup=cfg.gate_warmup,
                    gate_weight_decay=cfg.gate_weight_decay, reduction=cfg.reduction, batch_size=batch_size,
                    dataset_size=dataset_size)
    if cfg.optimizer == "grokfast":
        return dict(grokfast_alpha=cfg.grokfast_alpha, grokfast_lamb=cfg.grokfast_lamb)
    return {}


def optimizer_diagnostics(optimizer) -> dict[str, float]:
    """Gate statistics of the last step (PopRiskAdamW), ``{}`` for other optimizers."""
    if not hasattr(optimizer, "diagnostics"):
        return {}
    values = optimizer.diagnostics()
    return {k: values[k] for k in DIAGNOSTIC_KEYS}
