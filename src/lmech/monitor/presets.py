"""The Monitor's own probe (:class:`LossProbe`) and its two presets, ``"economy"`` and ``"full"``
(what each measures and costs: the docstring of :mod:`lmech.monitor`)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lmech.core.batch import split_batch
from lmech.probes.base import Cost, Probe, TrainState

PRESETS = ("economy", "full")


class LossProbe:
    r"""Monitor probe: ``loss`` of the model on the probe batch (and ``accuracy`` for integer
    targets with outputs ``(n, classes)``), in eval mode.

    Several processes: the global-batch values, :math:`\sum_r n_r L_r / N` (``loss_fn`` a mean
    over examples) and the fraction of correct predictions over all :math:`N` examples, from one
    all-reduce of each rank's weighted sums."""

    name = "probe"
    cost: Cost = "low"
    shards = True

    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        inputs, targets = split_batch(state.batch)
        n = inputs[0].shape[0]
        with torch.no_grad():
            out = state.model(*inputs)
            loss = state.loss_fn(out, targets).detach().to(torch.float64)
            has_accuracy = (isinstance(targets, Tensor) and not targets.is_floating_point()
                            and isinstance(out, Tensor) and out.dim() == targets.dim() + 1)
            correct = (out.argmax(-1) == targets).double().sum() if has_accuracy else torch.zeros((), dtype=torch.float64)
        if state.dist is None:
            metrics = {"loss": float(loss)}
            if has_accuracy:
                metrics["accuracy"] = float(correct / targets.numel())
            return metrics
        d = state.dist
        count = targets.numel() if isinstance(targets, Tensor) else n
        parts = torch.stack([loss * n if n else loss.new_zeros(()), correct.cpu().to(torch.float64),
                             torch.tensor(float(n), dtype=torch.float64), torch.tensor(float(count), dtype=torch.float64)])
        total_loss, total_correct, total_n, total_count = d.sum(parts.cpu()).tolist()
        metrics = {"loss": total_loss / total_n}
        if has_accuracy:
            metrics["accuracy"] = total_correct / total_count
        return metrics


def preset(name: Literal["economy", "full"], *, train_batch: int | None = None) -> list[Probe]:
    """The probe list of a preset (module docstring); fresh objects each call.

    ``train_batch``: the number of examples in one training step. Given, the economy preset sizes
    its samples by it instead of the fixed 32 and 64 examples (module docstring, "sized by the
    training batch"): ``Monitor(model, loss_fn, batch, probes=preset("economy", train_batch=8))``.
    """
    from lmech.probes.gradnoise import GradNoiseProbe
    from lmech.probes.ntk import NTKProbe
    from lmech.probes.representations import RepresentationProbe
    from lmech.probes.sharpness import HessianTraceProbe, SharpnessProbe, SpectralDensityProbe
    from lmech.probes.weights import WeightSpectrumProbe

    if train_batch is not None and not (isinstance(train_batch, int) and train_batch >= 1):
        raise ValueError(f"train_batch must be a positive number of examples, got {train_batch!r}")
    if name == "economy":
        noise, curvature = (32, 64) if train_batch is None else (max(3, min(32, train_batch)),
                                                                 max(1, min(64, train_batch // 4)))
        return [LossProbe(), GradNoiseProbe(per_layer=True, num_examples=noise),
                WeightSpectrumProbe(fit_power_law=False, tol=1e-3),
                SharpnessProbe(k=1, tol=5e-2, max_iter=4, num_examples=curvature)]
    if name == "full":
        return [LossProbe(), SharpnessProbe(k=3, preconditioned="auto", per_layer=True),
                HessianTraceProbe(num_matvecs=30), SpectralDensityProbe(),
                NTKProbe(num_examples=64, per_layer=True), GradNoiseProbe(per_layer=True),
                WeightSpectrumProbe(fit_power_law=True, singular_values=True), RepresentationProbe()]
    raise ValueError(f"unknown probe preset {name!r}; use one of {', '.join(PRESETS)} or a list of probes")


__all__ = ["LossProbe", "PRESETS", "preset"]
