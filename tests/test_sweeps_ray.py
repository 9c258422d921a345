"""The Ray executor on a local 2-CPU Ray instance: same runs, same metrics as the local executor."""

import pytest

ray = pytest.importorskip("ray")

from lmech.runs import RunStore, load  # noqa: E402
from lmech.sweeps import run_sweep  # noqa: E402

TINY = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 40, "eval_every": 10, "width": 16,
        "batch_size": 32}
GRID = {"lr": [1e-3, 1e6]}  # lr=1e6 diverges (NaN loss at step 4)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (it takes seconds to start); run_sweep reuses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_runs_and_metrics_as_local(ray_session, tmp_path):
    kwargs = dict(sets=TINY, grid=GRID, seeds=2, workers=2, progress=False)
    local = run_sweep("grokking", executor="local", out=tmp_path / "local", **kwargs)
    remote = run_sweep("grokking", executor="ray", out=tmp_path / "ray", **kwargs)
    assert ray.is_initialized()  # the fixture's session was used, not shut down
    assert remote["state"].tolist() == ["done", "done", "diverged", "diverged"]
    assert remote.attrs["sweep"] == local.attrs["sweep"]
    same = ["run_id", "seed", "lr", "state", "message", "final_test_acc", "steps_run", "step_to_95"]
    assert remote[same].equals(local[same])
    order = ["run_id", "step", "name"]  # load() lists runs by creation time, which differs between the two
    metrics_local = load(sweep=local.attrs["sweep"], root=tmp_path / "local").sort_values(order, ignore_index=True)
    metrics_ray = load(sweep=remote.attrs["sweep"], root=tmp_path / "ray").sort_values(order, ignore_index=True)
    assert len(metrics_ray) > 0 and metrics_ray.equals(metrics_local)  # bit for bit: one thread each, same seeds
    # each task wrote its own run folder, from a Ray worker process
    store = RunStore(tmp_path / "ray")
    assert {store.status(r)["pid"] for r in remote["run_id"]}.isdisjoint({None})
    assert sorted(store.runs()["id"]) == sorted(remote["run_id"])

    # reconnecting to the sweep: finished runs are skipped
    again = run_sweep("grokking", executor="ray", out=tmp_path / "ray", **kwargs)
    assert not again["ran"].any() and again["state"].tolist() == remote["state"].tolist()
