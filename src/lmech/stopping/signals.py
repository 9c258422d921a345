r"""The validation-free signals the criteria read, measured in one call from a model and a batch.

:func:`gradient_signals` runs :func:`lmech.probes.grad_noise` once on ``(x, y)`` (per-example
gradients, the ``"linear"`` sums-of-squares path where it applies) and returns

* ``loss``: the mean training loss on the batch;
* ``gate_fraction``: fraction of coordinates with :math:`\bar g_k^2 > \hat\sigma_k^2/b`
  (:mod:`lmech.stopping.gate`);
* ``eb``: Mahsereci et al.'s evidence-based criterion (:mod:`lmech.stopping.evidence`);
* ``mean_gsnr``: mean per-example gradient SNR :math:`\bar g_k^2/\hat\sigma_k^2`.

The path-based signals (``poprisk_loo``, ``poprisk_gcv``) come from
:meth:`lmech.probes.gramian.PathRecorder.step`, ``channel_noise_risk`` from
:func:`lmech.stopping.channel_noise.channel_noise_signals`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 1)
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> s = gradient_signals(net, nn.functional.mse_loss, x, y)
    >>> sorted(s)
    ['eb', 'gate_fraction', 'loss', 'mean_gsnr']
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lmech.probes.gradnoise import grad_noise
from lmech.stopping.evidence import eb_criterion

__all__ = ["gradient_signals"]


def gradient_signals(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, epsilon: float = 1e-5) -> dict[str, float]:
    """``loss``, ``gate_fraction``, ``eb`` and ``mean_gsnr`` on the batch ``(x, y)`` (module docstring);
    the model is measured in eval mode and returned to its previous mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = float(loss_fn(model(x), y))
        gn = grad_noise(model, loss_fn, (x, y))
    finally:
        model.train(was)
    return {"loss": loss, "gate_fraction": gn.total.gate_fraction, "eb": eb_criterion(gn, epsilon),
            "mean_gsnr": gn.total.mean_gsnr}
