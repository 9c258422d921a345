"""Config keys of validation-free early stopping, shared by the catalog entries on the training loop.

An entry's config inherits :class:`StoppingKeys`, validates them with
:func:`validate_stopping_keys` (naming the rules it can feed) and hands
:func:`stopping_driver` to its :class:`lmech.experiments.loop.TrainingLoop`::

    lmech run inr-noise --quick --set stopping=path_loo --set stop_patience=10

``stopping`` names a rule of :mod:`lmech.stopping`:

==================  =========================================  ===================================
``stopping``        criterion                                  keys it reads
==================  =========================================  ===================================
``none``            (no rule: the run is exactly as before)    --
``path_loo``        :class:`PathLOOStopping` (``estimate="loo"``)  patience, min_step, min_delta
``path_gcv``        :class:`PathLOOStopping` (``estimate="gcv"``)  patience, min_step, min_delta
``channel_noise``   :class:`ChannelNoiseStopping`              patience, min_step, min_delta
``gate``            :class:`GateFractionStopping`              patience, min_step, factor
``evidence``        :class:`EvidenceStopping` (Mahsereci 2017)  patience, min_step
``train_loss``      :class:`TrainLossPatience`                 patience, min_step, min_delta
==================  =========================================  ===================================

``patience`` and ``min_step`` count the loop's evaluations and steps (the rule is fed at every
evaluation after step 0). The oracle (:class:`lmech.stopping.OracleStopping`) is not offered: it
needs held-out data, which a validation-free rule must not read; every entry logs its held-out
metric at each evaluation, so a ``stopping=none`` run scores any rule against the oracle afterwards
(:func:`lmech.stopping.oracle_step`). At ``stopping=none`` with the other keys at their defaults
the keys are hash-neutral (:data:`lmech.runs.provenance.HASH_NEUTRAL`): run ids are unchanged.

Entries with the keys (each docstring says what its rule reads and when it is fed):

* ``inr-noise``: every rule (path rules up to 1,024 points, not with Grokfast);
* ``pinn-advection``, ``quanta``: the gradient rules;
* ``label-noise``: every rule, fed at each readout; the path rules read the entry's own recorder;
* ``double-descent``: every rule, one per width, fed at each record;
* ``prune-reservoir``: the gradient rules, one per task; the stopped network is the one pruned.

Entries on the loop without them, because stopping would defeat what they measure:

* ``scaling-law``: :math:`L(N, D)` is a function of the ``D`` examples each run sees exactly once;
* ``coupling``: checks the train-test coupling identity along a fixed path (two arms, same horizon);
* ``grokking-channel``: training signals settle at memorization, long before the delayed
  generalization the entry exists to show;
* ``lazy-rich``: compares how far weights and kernels move across widths and alphas in the same time;
* ``edge-of-stability``, ``stochastic-stability``, ``central-flows``: the sharpness dynamics over a
  fixed horizon are the measurement, not a model to select;
* ``mup``: learning-rate transfer compares losses across widths after the same number of steps;
* ``deep-linear``, ``saddle-to-saddle``: the mode dynamics against their closed form over time;
* ``in-context``: in-context regression is compared with closed-form predictors at convergence;
* ``transformer-clusters``: the clusters of the representations after a fixed training are measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from lmech.errors import ConfigError
from lmech.experiments.base import require

StoppingRule = Literal["none", "path_loo", "path_gcv", "channel_noise", "gate", "evidence", "train_loss"]
STOPPING_RULES = ("none", "path_loo", "path_gcv", "channel_noise", "gate", "evidence", "train_loss")
PATH_RULES = ("path_loo", "path_gcv", "channel_noise")
GRADIENT_RULES = ("gate", "evidence", "train_loss")
MIN_DELTA_RULES = ("path_loo", "path_gcv", "channel_noise", "train_loss")

NEUTRAL = {"stopping": "none", "stop_patience": 5, "stop_min_step": 0, "stop_min_delta": 0.0, "stop_factor": 1.0}
"""The keys' defaults; at these values a run computes what it computed before the keys existed."""


@dataclass
class StoppingKeys:
    """``stopping`` and its parameters (module docstring)."""

    stopping: StoppingRule = "none"   # validation-free early stopping rule (lmech.stopping), fed at each evaluation
    stop_patience: int = 5            # evaluations without improvement (minimum rules) or in a row (threshold rules)
    stop_min_step: int = 0            # the rule ignores evaluations before this step
    stop_min_delta: float = 0.0       # relative improvement that resets the patience (minimum rules)
    stop_factor: float = 1.0          # gate: fire at gate_fraction <= factor x the pure-noise fraction


def build_criterion(cfg, batch_size: int | None = None):
    """The :mod:`lmech.stopping` criterion of ``cfg.stopping`` (``None`` for ``"none"``);
    ``batch_size``: examples of the gradient-signal batch (the gate's null fraction)."""
    from lmech import stopping as s

    rule, common = cfg.stopping, dict(patience=cfg.stop_patience, min_step=cfg.stop_min_step)
    if rule == "none":
        return None
    if rule in ("path_loo", "path_gcv"):
        return s.PathLOOStopping(rule.split("_")[1], min_delta=cfg.stop_min_delta, **common)
    if rule == "channel_noise":
        return s.ChannelNoiseStopping(min_delta=cfg.stop_min_delta, **common)
    if rule == "gate":
        return s.GateFractionStopping(batch_size=batch_size, factor=cfg.stop_factor, **common)
    if rule == "evidence":
        return s.EvidenceStopping(**common)
    if rule == "train_loss":
        return s.TrainLossPatience(min_delta=cfg.stop_min_delta, **common)
    if rule == "oracle":
        raise ConfigError("stopping=oracle reads held-out data, so it is no validation-free rule; run with "
                          "stopping=none and take lmech.stopping.oracle_step of the logged held-out metric")
    raise ConfigError(f"bad value for stopping: {rule!r} is not one of {', '.join(STOPPING_RULES)}")


def validate_stopping_keys(cfg, supported: tuple[str, ...], batch_size: int | None = None, why: str = "") -> None:
    """ConfigError for a rule the entry cannot feed (``why`` says why), parameters the rule does not
    read, or parameters out of range (checked by building the criterion)."""
    rule = cfg.stopping
    if rule == "none":
        changed = [k for k, v in NEUTRAL.items() if k != "stopping" and getattr(cfg, k) != v]
        require(not changed, f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect with "
                             "stopping=none; choose a rule with --set stopping=...")
        return
    if rule not in supported and rule in STOPPING_RULES:
        raise ConfigError(f"stopping={rule} is not available here ({why}); use one of {', '.join(supported)}")
    require(cfg.stop_min_delta == 0.0 or rule in MIN_DELTA_RULES,
            f"stop_min_delta has no effect with stopping={rule} (it applies to {', '.join(MIN_DELTA_RULES)})")
    require(cfg.stop_factor == 1.0 or rule == "gate", f"stop_factor has no effect with stopping={rule} (gate only)")
    build_criterion(cfg, batch_size)


def stopping_driver(cfg, model, loss_fn=None, batch: tuple | None = None, recorder: Callable | None = None,
                    batch_indices: Callable | None = None):
    """The :class:`lmech.stopping.driver.StoppingDriver` of ``cfg``'s rule for a
    :class:`~lmech.experiments.loop.TrainingLoop` (``None`` at ``stopping=none``)."""
    if cfg.stopping == "none":
        return None
    from lmech.stopping.driver import StoppingDriver

    size = None if batch is None else len(batch[1])
    return StoppingDriver(build_criterion(cfg, size), model, loss_fn, batch, recorder=recorder,
                          batch_indices=batch_indices, rule=cfg.stopping)


__all__ = ["StoppingKeys", "StoppingRule", "STOPPING_RULES", "PATH_RULES", "GRADIENT_RULES", "NEUTRAL",
           "build_criterion", "validate_stopping_keys", "stopping_driver"]
