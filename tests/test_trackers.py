"""WandbSink and MLflowSink with the real packages: a W&B offline run and a local MLflow SQLite
store, each read back after the Monitor wrote to it."""

from __future__ import annotations

import glob
import json
import struct
import time

import pytest
import torch
from torch import nn

from lmech import Monitor
from lmech.monitor import LossProbe
from lmech.probes import NTKProbe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")


def monitored_run(sink, steps=(0, 10, 20)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    mon = Monitor(net, nn.functional.cross_entropy, (x, y), probes=[LossProbe(), NTKProbe(num_examples=6)],
                  every=10, sinks=[sink])
    written = {s: mon.step(s) for s in steps}
    mon.close()
    return written


def read_wandb_records(path):
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB log records (crc32, length, type) in 32 KiB blocks, each a protobuf
    ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        if len(chunk) < n:  # a record still being written
            break
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record; middle/last extend
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            records.append(r)
    return records


def test_wandb_sink_offline_run_read_back(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lmech.monitor import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(project="lmech-test", dir=str(tmp_path), mode="offline")
    assert sink.run is wandb.run
    written = monitored_run(sink)
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history: dict = {}
    deadline = time.monotonic() + 30
    while True:  # wandb-core may still be writing the log when finish() returns on a loaded machine
        history = {}
        for r in read_wandb_records(path):
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[r.history.step.num] = items
        if len(history) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(history) == [0, 10, 20]  # the training step is the W&B step axis
    for step, metrics in written.items():
        got = history[step]
        assert got["_step"] == step
        assert got["probe/loss"] == pytest.approx(metrics["probe/loss"], rel=1e-12)
        assert got["ntk/trace"] == pytest.approx(metrics["ntk/trace"], rel=1e-12)
        # the NTK spectrum (an array) as a histogram of its values
        assert got["ntk/spectrum/_type"] == "histogram"
        assert sum(got["ntk/spectrum/values"]) == metrics["ntk/spectrum"].numel()


def test_wandb_sink_uses_active_run_and_leaves_it_open(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lmech.monitor import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="lmech-test", dir=str(tmp_path), mode="disabled")
    try:
        sink = WandbSink()
        assert sink.run is run and not sink._owned
        sink.close()  # does not finish a run it did not start
        with pytest.raises(ValueError, match="either run= or"):
            WandbSink(run=run, project="x")
    finally:
        run.finish()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite tracking store for the module (creating its schema takes seconds)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # a SQLite store puts artifacts under ./mlruns of the working directory unless the experiment
    # names a location: keep them in the temporary folder, not in the checkout
    MlflowClient(tracking_uri=uri).create_experiment("lmech-test", artifact_location=(folder / "artifacts").as_uri())
    return uri


def test_mlflow_sink_sqlite_store_read_back(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from lmech.monitor import MLflowSink

    uri = mlflow_uri
    sink = MLflowSink(experiment="lmech-test", run_name="monitor", tracking_uri=uri)
    written = monitored_run(sink)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "monitor"
    for key in ("probe/loss", "ntk/trace", "ntk/lambda_1", "probe/seconds"):
        got = client.get_metric_history(sink.run_id, key)
        assert [m.step for m in got] == [0, 10, 20]
        for m in got:
            assert m.value == pytest.approx(float(written[m.step][key]), rel=1e-12)
    arrays = sorted(a.path for a in client.list_artifacts(sink.run_id, "lmech/arrays"))
    assert arrays == [f"lmech/arrays/step_{s:09d}.json" for s in (0, 10, 20)]
    local = client.download_artifacts(sink.run_id, arrays[-1], str(tmp_path / "dl"))
    payload = json.load(open(local))
    assert payload["step"] == 20
    assert payload["arrays"]["ntk/spectrum"] == pytest.approx(written[20]["ntk/spectrum"].double().tolist())


def test_mlflow_sink_active_run_and_batches(mlflow_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lmech.monitor import MLflowSink

    uri = mlflow_uri
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            sink = MLflowSink()
            assert sink.run_id == active.info.run_id
            sink.MAX_BATCH = 7  # more scalars than one batch holds: several log_batch calls
            many = {f"m/{i}": float(i) for i in range(20)}
            sink.write(5, many)
            sink.close()  # the active run stays open
            assert mlflow.active_run().info.run_id == active.info.run_id
        client = MlflowClient(tracking_uri=uri)
        got = client.get_run(active.info.run_id).data.metrics
        assert {k: got[k] for k in many} == many
    finally:
        mlflow.set_tracking_uri(None)
