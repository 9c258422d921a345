"""The Ray executor: the same runs as Ray tasks (``num_cpus=1`` each), on a local or remote cluster.

Needs the ``ray`` extra (``pip install "lmech[ray]"``); Ray is imported only when this executor is
chosen. Each task calls :func:`lmech.sweeps.worker.execute`, which writes its own run folder into
the store, so the store path must be visible at the same absolute path from the driver and every
node (a shared file system); on a remote cluster lmech must be installed on the nodes.

* ``address=None`` and no Ray session in this process: a local instance is started with
  ``ray.init(num_cpus=workers or os.cpu_count())`` and shut down at the end. An already
  initialized session (e.g. a test fixture's) is used as it is and left running.
* ``address="auto"`` or ``"ray://host:10001"``: connect to that cluster.
* Tasks are not retried by Ray (``max_retries=0``): a task whose worker dies is recorded
  ``failed`` with Ray's error, like a dead local worker, and re-run with ``retry_failed``.
* At most ``workers`` tasks (default: the cluster's CPU count) are in flight, so "running" in the
  progress bar means running, not queued.

Reconnecting: if the driver dies, Ray cancels the tasks it owns; the runs they were writing are
left ``incomplete``. Running the same sweep again (same command, or ``run_sweep`` with the same
arguments) skips every finished run and re-runs only the rest.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable

from lmech.errors import ConfigError
from lmech.sweeps.plan import RunSpec


def require_ray():
    """Import Ray, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray, which is not installed: "
                          "pip install 'lmech[ray]' (or use --executor local)") from None
    return ray


def run_ray(specs: list[RunSpec], workers: int | None, address: str | None,
            on_start: Callable[[RunSpec], None], on_finish: Callable[[RunSpec, dict], None]) -> None:
    """Run ``specs`` as Ray tasks; call back as each is submitted and as each finishes."""
    import logging

    ray = require_ray()
    from lmech.sweeps.worker import execute, lost

    started_here = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started_here = True
    try:
        capacity = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=0)(execute)
        pending = deque(specs)
        inflight: dict = {}
        while pending or inflight:
            while pending and len(inflight) < capacity:
                spec = pending.popleft()
                inflight[task.remote(spec)] = spec
                on_start(spec)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                spec = inflight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:
                    first_line = (str(err).strip().splitlines() or [""])[0]
                    outcome = lost(spec, f"Ray task died ({type(err).__name__}: {first_line})")
                on_finish(spec, outcome)
    finally:
        for ref in list(inflight):
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
