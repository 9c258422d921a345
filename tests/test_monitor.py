"""lmech.monitor: probes never change the run; sinks; presets; budget errors."""

from __future__ import annotations

import doctest
import importlib
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmech
from lmech.errors import MemoryBudgetError
from lmech.monitor import ListSink, LossProbe, Monitor, RunSink, TensorBoardSink, preset
from lmech.probes.sharpness import SharpnessProbe
from lmech.runs import RunStore

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model[1].eval()  # a frozen BatchNorm: mixed training flags must come back as they were
    return model


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def train(steps, monitor_factory=None):
    """Adam with dropout, a frozen BatchNorm, global-RNG shuffling, numpy and python draws."""
    model = make_model()
    model.train()
    model[1].eval()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = monitor_factory(model, (x[:40], y[:40])) if monitor_factory else None
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    losses = []
    for step in range(steps):
        idx = torch.randperm(96)[:32]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append((loss.item(), float(np.random.rand()), random.random()))
        if mon is not None:
            mon.step(step, optimizer=opt)
    return losses, model, opt, mon


def test_doctests():
    module = importlib.import_module("lmech.monitor")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


def test_lazy_export():
    assert lmech.Monitor is Monitor


def test_same_loss_curve_with_and_without_monitor():
    base, model0, opt0, _ = train(12)
    full, model1, opt1, mon = train(12, lambda m, b: Monitor(m, F.cross_entropy, b, probes="full", every=4))
    assert full == base  # bit for bit: losses, numpy and python random streams
    for p0, p1 in zip(model0.state_dict().values(), model1.state_dict().values()):
        assert torch.equal(p0, p1)
    steps = [s for s, _ in mon.history.records]
    assert steps == [0, 4, 8]
    last = mon.history.records[-1][1]
    for key in ("sharpness/lambda_1", "sharpness/adaptive_lambda_1", "hessian_trace/trace",
                "ntk/drift", "gradnoise/noise_scale", "weights/alpha_mean", "representations/cka/0",
                "probe/loss", "probe/accuracy", "hessian_density/density", "ntk/seconds"):
        assert key in last, key
    assert last["sharpness/adaptive_threshold"] == pytest.approx(38.0)
    assert model1.training and not model1[1].training  # flags restored exactly


def test_measure_leaves_grads_and_optimizer_state_alone():
    _, model, opt, _ = train(3)
    x, y = data()
    loss = F.cross_entropy(model(x[:32]), y[:32])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    mon = Monitor(model, F.cross_entropy, (x[:40], y[:40]), probes="full", every=1)
    mon.step(0, optimizer=opt)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for k, v in opt.state.items():
        for kk, vv in v.items():
            assert torch.equal(vv, state[k][kk])


def test_economy_preset_and_list_sink_dataframe():
    _, model, opt, mon = train(6, lambda m, b: Monitor(m, F.cross_entropy, b, every=2))
    df = mon.history.scalars()
    assert list(df.index) == [0, 2, 4]
    assert {"sharpness/lambda_1", "gradnoise/snr", "weights/rel_change_fro", "probe/loss"} <= set(df.columns)
    assert df["weights/rel_change_fro"].iloc[0] == 0.0 and df["weights/rel_change_fro"].iloc[-1] > 0
    assert mon.seconds > 0 and "economy" not in repr(mon) and "every=2" in repr(mon)
    assert [p.name for p in preset("economy")] == ["probe", "gradnoise", "weights", "sharpness"]


def test_run_sink_and_tensorboard_sink(tmp_path):
    x, y = data()
    model = make_model().eval()
    store = RunStore(tmp_path / "runs")
    with store.create("monitor-test", {"a": 1}, seed=0) as run:
        mon = Monitor(model, F.cross_entropy, (x, y),
                      probes=[LossProbe(), SharpnessProbe(k=2, tol=1e-3)], every=1, sinks=[run])
        assert isinstance(mon.sinks[0], RunSink) and mon.history is None
        mon.step(0)
        mon.step(1)
        mon.close()
        run_id = run.id
    wide = store.metrics(run_id, wide=True)
    assert list(wide["step"]) == [0, 1]
    assert "sharpness/lambda_2" in wide.columns
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = Monitor(model, F.cross_entropy, (x, y), probes=[LossProbe()], every=1,
                  sinks=[TensorBoardSink(str(tmp_path / "tb")), ListSink()])
    mon.step(0)
    mon.step(1)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("probe/loss")
    assert [e.step for e in events] == [0, 1]
    assert events[0].value == pytest.approx(mon.history.records[0][1]["probe/loss"], rel=1e-6)


def test_budget_refusal_and_on_error_warn():
    x, y = data()
    model = make_model().eval()
    mon = Monitor(model, F.cross_entropy, (x, y), probes=[SharpnessProbe()], budget_mb=0.001)
    with pytest.raises(MemoryBudgetError, match="lower max_iter or select fewer parameters"):
        mon.step(0)
    assert model[0].training is False  # restored even after the error (model was in eval)
    mon = Monitor(model, F.cross_entropy, (x, y), probes=[LossProbe(), SharpnessProbe()],
                  budget_mb=0.001, on_error="warn")
    with pytest.warns(UserWarning, match="probe 'sharpness' failed"):
        out = mon.step(0)
    assert "probe/loss" in out and "sharpness/lambda_1" not in out


def test_bad_arguments():
    x, y = data()
    model = make_model()
    with pytest.raises(ValueError, match="unknown probe preset"):
        Monitor(model, F.cross_entropy, (x, y), probes="cheap")
    with pytest.raises(ValueError, match="every"):
        Monitor(model, F.cross_entropy, (x, y), every=0)
    with pytest.raises(TypeError, match="not a probe"):
        Monitor(model, F.cross_entropy, (x, y), probes=[object()])
    with pytest.raises(ValueError, match="share a name"):
        Monitor(model, F.cross_entropy, (x, y), probes=[LossProbe(), LossProbe()])
    with pytest.raises(ValueError, match="batch must be a pair"):
        Monitor(model, F.cross_entropy, x)
    with pytest.raises(TypeError, match="sink"):
        Monitor(model, F.cross_entropy, (x, y), sinks=[42])
    with pytest.raises(ValueError, match="needs the optimizer"):
        Monitor(model.eval(), F.cross_entropy, (x, y), probes=[SharpnessProbe(preconditioned=True)]).step(0)


def test_numpy_blas_runs_on_torch_thread_count_during_a_measurement():
    """OpenBLAS threads started by a probe's eigensolve would spin on other cores while a
    one-thread training run goes on; inside a measurement BLAS gets torch's thread count."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    class Spy:
        name, cost = "spy", "low"

        def measure(self, state):
            self.seen = blas_threads()
            return {}

    spy, before, threads = Spy(), blas_threads(), torch.get_num_threads()
    net = nn.Linear(3, 2)
    torch.set_num_threads(1)
    try:
        Monitor(net, nn.functional.mse_loss, (torch.randn(8, 3), torch.randn(8, 2)), probes=[spy]).step(0)
    finally:
        torch.set_num_threads(threads)
    assert spy.seen and all(n == 1 for n in spy.seen)
    assert blas_threads() == before  # restored afterwards
