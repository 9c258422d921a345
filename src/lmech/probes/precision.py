r"""The precision the instruments measure in: the model's own parameter dtype, never autocast.

A training step under ``torch.autocast`` (bfloat16 or float16) runs matrix products in the low
precision while the parameters, their gradients and the optimizer state stay float32. A probe asked
for a Hessian eigenvalue, an NTK or a gradient-noise ratio wants the derivatives of *that* float32
function: bfloat16 products carry a relative rounding error of :math:`2^{-8} \approx 4\cdot
10^{-3}` per product, which would dominate a Lanczos residual of :math:`10^{-3}` or the
leave-one-out cancellation of the gradient noise, and mixed-dtype products inside the probes'
linear algebra fail outright (an autocast bfloat16 HVP meeting a float32 Lanczos basis). So every
probe runs with autocast switched off (:func:`full_precision`), whatever context the training
loop has open:

* forward and backward passes, JVPs, VJPs and HVPs run in the parameters' dtype (float32 for
  autocast training);
* reductions (sums, dot products, norms, Lanczos recurrences, kernel eigendecompositions) are
  float32 or wider; the probes that need it accumulate in float64 (the gradient-noise moments,
  the gramian operators, representation similarities, spectral densities and tridiagonal
  eigensolves) and say so in their docstrings;
* results come back as Python floats or float32/float64 tensors.

The :class:`~lmech.monitor.Monitor` wraps every measurement in :func:`full_precision`; the probe
classes and the main functions (``sharpness``, ``hessian_trace``, ``hessian_spectral_density``,
``ntk``) also switch it off themselves, so calling them inside an autocast region is safe.
A model whose parameters are themselves stored in bfloat16 (no float32 master copy) is measured
in bfloat16 products with the wider reductions above.

Example:
    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     with full_precision():
    ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["full_precision", "AUTOCAST_DEVICE_TYPES"]

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
"""Device types whose autocast state :func:`full_precision` switches off (those torch knows)."""


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Switch autocast off on every device type where it is on, for the block (or the decorated
    function: ``@full_precision()``); restores it on exit. Costs nothing where it is off."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except RuntimeError:                      # a device type this build does not know
                continue
            if enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
