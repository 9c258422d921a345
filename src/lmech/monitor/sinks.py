"""Where the Monitor's measurements go: the :class:`Sink` protocol and the built-in sinks (memory,
an lmech run, TensorBoard). The experiment-tracker sinks (W&B, MLflow) are in
:mod:`lmech.monitor.trackers`."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

@runtime_checkable
class Sink(Protocol):
    """Where measurements go: ``write(step, metrics)`` with floats and tensors; ``close()``."""

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None: ...

    def close(self) -> None: ...


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``(scalars, arrays)``: one-element values as floats, spectra and other arrays as tensors."""
    scalars, arrays = {}, {}
    for k, v in metrics.items():
        if isinstance(v, Tensor) and v.numel() != 1:
            arrays[k] = v
        elif isinstance(v, np.ndarray) and v.size != 1:
            arrays[k] = torch.as_tensor(v)
        else:
            scalars[k] = float(v)
    return scalars, arrays


_split = split_metrics


class ListSink:
    """Keeps every measurement in memory: ``records`` is a list of ``(step, metrics)``;
    :meth:`scalars` gives a wide DataFrame (one row per step, one column per scalar metric)."""

    def __init__(self):
        self.records: list[tuple[int, dict[str, float | Tensor]]] = []

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        self.records.append((int(step), dict(metrics)))

    def scalars(self):
        import pandas as pd

        rows = [{"step": s, **_split(m)[0]} for s, m in self.records]
        return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()

    def close(self) -> None:
        pass


class RunSink:
    """Writes to an lmech run (:class:`lmech.runs.store.Run`): scalars with ``run.log``, arrays
    (spectra) with ``run.log_array``. The run is not finished by :meth:`close` (its ``with``
    block owns it)."""

    def __init__(self, run):
        if not (hasattr(run, "log") and hasattr(run, "log_array")):
            raise TypeError(f"RunSink needs an lmech Run (with log and log_array), got {type(run).__name__}")
        self.run = run

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        scalars, arrays = _split(metrics)
        if scalars:
            self.run.log(step, **scalars)
        for name, values in arrays.items():
            self.run.log_array(step, name, values)

    def close(self) -> None:
        self.run.flush()


class TensorBoardSink:
    """Writes to TensorBoard event files (extra ``lmech[tensorboard]``): scalars with
    ``add_scalar``, arrays as histograms. Give ``log_dir`` or an existing ``SummaryWriter``."""

    def __init__(self, log_dir: str | None = None, writer=None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                raise ImportError("TensorBoardSink needs the tensorboard package: "
                                  "pip install 'lmech[tensorboard]'") from e
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        scalars, arrays = _split(metrics)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        for name, values in arrays.items():
            finite = values.detach().reshape(-1).to(torch.float64)
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                self.writer.add_histogram(name, finite, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _as_sink(s) -> Sink:
    if isinstance(s, Sink):
        return s
    if hasattr(s, "log") and hasattr(s, "log_array"):
        return RunSink(s)
    raise TypeError(f"a sink needs write(step, metrics) and close(), or be an lmech Run; got {type(s).__name__}")


__all__ = ["ListSink", "RunSink", "Sink", "TensorBoardSink", "split_metrics"]
