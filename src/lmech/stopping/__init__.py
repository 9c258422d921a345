r"""Validation-free early stopping: decide when to stop from the training run alone.

One criterion object per rule, usable in any loop (``update(step, **signals)``, ``should_stop``,
``best_step``; protocol in :mod:`lmech.stopping.base`), with adapters for Lightning
(:mod:`lmech.integrations.stopping_lightning`) and the HF ``Trainer``
(:mod:`lmech.integrations.stopping_hf`).

lmech's own criteria (the generalization theory of Litman & Guo 2026; formulas in each module):

==========================  ===================================  =======================================
criterion                   signal                               rule
==========================  ===================================  =======================================
:class:`PathLOOStopping`    ``poprisk_loo`` / ``poprisk_gcv``    minimum of the path leave-one-out risk
:class:`GateFractionStopping` ``gate_fraction``                  gate opens no more than noise would
:class:`ChannelNoiseStopping` ``channel_noise_risk``             minimum of loss + channel noise energy
==========================  ===================================  =======================================

Baselines: :class:`EvidenceStopping` (Mahsereci et al. 2017, ``eb``), :class:`TrainLossPatience`
(``loss``) and :class:`OracleStopping` (``heldout_loss``: needs held-out data; the reference).

Example (any loop)::

    from lmech.stopping import GateFractionStopping, gradient_signals
    stopper = GateFractionStopping(batch_size=len(x))
    for step in range(1, 10_001):
        train_step()
        if step % 50 == 0 and stopper.update(step, **gradient_signals(model, loss_fn, x, y)):
            break
    print(stopper.best_step)

The same loop with the signals measured for you: :class:`lmech.stopping.driver.StoppingDriver`
(``driver.observe(step)`` at an evaluation, ``driver.after_step()`` after each optimizer step for the
path rules); the catalog's training loop takes one, and the entries on it expose the rules as the
config key ``stopping`` (:mod:`lmech.experiments.stopping_keys`)::

    lmech run inr-noise --quick --set stopping=path_loo

Benchmark and results: ``scripts/no_validation_study.py``, docs/results/no-validation.md.
"""

from lmech.stopping.base import MinimumRule, StoppingCriterion, ThresholdRule, replay
from lmech.stopping.channel_noise import ChannelNoiseStopping, channel_noise_risk, channel_noise_signals
from lmech.stopping.driver import StoppingDriver
from lmech.stopping.evidence import EvidenceStopping, eb_criterion
from lmech.stopping.gate import GateFractionStopping, null_gate_fraction
from lmech.stopping.oracle import OracleStopping, oracle_step
from lmech.stopping.path_loo import PathLOOStopping
from lmech.stopping.signals import gradient_signals
from lmech.stopping.train_loss import TrainLossPatience

__all__ = [
    "StoppingCriterion", "MinimumRule", "ThresholdRule", "replay",
    "PathLOOStopping", "GateFractionStopping", "null_gate_fraction", "ChannelNoiseStopping",
    "channel_noise_risk", "channel_noise_signals",
    "EvidenceStopping", "eb_criterion", "TrainLossPatience", "OracleStopping", "oracle_step",
    "gradient_signals", "StoppingDriver",
]
