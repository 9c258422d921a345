"""Monitor sinks for experiment trackers: Weights & Biases (:class:`WandbSink`) and MLflow
(:class:`MLflowSink`). Reached as ``lmech.monitor.WandbSink`` / ``lmech.monitor.MLflowSink`` (and by
their old path, ``lmech.integrations.trackers``).

Each imports its package when it is built, never at ``import lmech``; install the package
(``pip install wandb`` / ``pip install mlflow``, both in the extra ``lmech[integrations]``).

.. code-block:: python

    import wandb
    from lmech import Monitor
    from lmech.monitor import WandbSink

    wandb.init(project="my-project")
    monitor = Monitor(model, loss_fn, probe_batch, probes="economy", every=100, sinks=[WandbSink()])

Both log the scalars of a measurement at the training step given to :meth:`Monitor.step` (W&B's
``step``, MLflow's metric ``step``). Arrays (spectra) go to W&B as ``wandb.Histogram`` (finite
values), and to MLflow as one JSON artifact per measurement, ``lmech/arrays/step_<step>.json``
(MLflow metrics are scalars).
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import Tensor

from lmech.monitor.sinks import split_metrics

__all__ = ["WandbSink", "MLflowSink"]


def _finite(values: Tensor) -> Tensor:
    flat = values.detach().reshape(-1).to(torch.float64).cpu()
    return flat[torch.isfinite(flat)]


class WandbSink:
    """Writes Monitor measurements to a Weights & Biases run.

    ``WandbSink()`` logs to the active run (``wandb.run``) or, when none is active, starts one
    with ``wandb.init()``; ``WandbSink(project=..., name=..., mode="offline", ...)`` starts one
    with those ``wandb.init`` arguments; ``WandbSink(run=r)`` logs to ``r``. A run the sink
    started is finished by :meth:`close`; a run it was given or found is left open.

    Scalars: ``run.log(scalars, step=step)``, so the W&B step axis is the training step (W&B
    drops a step smaller than one already logged: log your own metrics at the same steps).
    Arrays: ``wandb.Histogram`` of the finite values, under the metric's name.
    """

    def __init__(self, run=None, **init_kwargs: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbSink needs the wandb package: pip install wandb "
                              "(or pip install 'lmech[integrations]')") from e
        self._wandb = wandb
        if run is not None and init_kwargs:
            raise ValueError("give either run= or wandb.init arguments, not both")
        self._owned = False
        if run is None and (init_kwargs or wandb.run is None):
            run = wandb.init(**init_kwargs)
            self._owned = True
        self.run = run if run is not None else wandb.run

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        scalars, arrays = split_metrics(metrics)
        row: dict[str, Any] = dict(scalars)
        for name, values in arrays.items():
            finite = _finite(values)
            if finite.numel():
                row[name] = self._wandb.Histogram(finite.numpy())
        if row:
            self.run.log(row, step=int(step))

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class MLflowSink:
    """Writes Monitor measurements to an MLflow run, one ``log_batch`` call per measurement.

    ``MLflowSink()`` logs to the active run (``mlflow.active_run()``) or starts one
    (``mlflow.start_run()``) when none is active; ``MLflowSink(run_id=...)`` logs to that run;
    ``MLflowSink(experiment="name", run_name=..., tracking_uri=...)`` starts a run there through
    ``MlflowClient``. A run the sink started is ended (``FINISHED``) by :meth:`close`.

    Scalars are ``Metric(key, value, timestamp, step)`` entries sent with
    ``MlflowClient.log_batch`` (in batches of at most 1,000, MLflow's limit). Arrays are written
    as one JSON artifact per measurement (module docstring).
    """

    MAX_BATCH = 1000

    def __init__(self, run_id: str | None = None, *, experiment: str | None = None,
                 run_name: str | None = None, tracking_uri: str | None = None, tags: dict | None = None):
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("MLflowSink needs the mlflow package: pip install mlflow "
                              "(or pip install 'lmech[integrations]')") from e
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._owned = False
        starting = experiment is not None or run_name is not None or tracking_uri is not None or tags
        if run_id is not None:
            if starting:
                raise ValueError("give either run_id= or the arguments of a new run, not both")
            self.run_id = run_id
        elif not starting and mlflow.active_run() is not None:
            self.run_id = mlflow.active_run().info.run_id
        elif not starting:
            self.run_id = mlflow.start_run().info.run_id
            self._owned = "fluent"
        else:
            exp_id = "0"
            if experiment is not None:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
            self._owned = "client"

    def write(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        from mlflow.entities import Metric

        scalars, arrays = split_metrics(metrics)
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, int(step)) for key, value in scalars.items()]
        for s in range(0, len(entries), self.MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[s:s + self.MAX_BATCH])
        if arrays:
            payload = {name: values.detach().reshape(-1).to(torch.float64).cpu().tolist()
                       for name, values in arrays.items()}
            payload = {k: [v if v == v and abs(v) != float("inf") else None for v in vs]
                       for k, vs in payload.items()}  # JSON has no NaN/inf
            self.client.log_text(self.run_id, json.dumps({"step": int(step), "arrays": payload}),
                                 f"lmech/arrays/step_{int(step):09d}.json")

    def close(self) -> None:
        if self._owned == "fluent":
            self._mlflow.end_run()
        elif self._owned == "client":
            self.client.set_terminated(self.run_id, "FINISHED")
        self._owned = False
