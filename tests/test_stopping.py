"""lmech.stopping: the rules, the signals against obvious computations, and the criteria on a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lmech.errors import ConfigError
from lmech.stopping import (
    ChannelNoiseStopping,
    EvidenceStopping,
    GateFractionStopping,
    OracleStopping,
    PathLOOStopping,
    TrainLossPatience,
    channel_noise_signals,
    eb_criterion,
    gradient_signals,
    null_gate_fraction,
    oracle_step,
    replay,
)


def test_minimum_rule_selects_minimum_and_stops_after_patience():
    s = PathLOOStopping(patience=3)
    values = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9]
    fired = [s.update(10 * i, poprisk_loo=v) for i, v in enumerate(values)]
    assert fired == [False] * 5 + [True, True]
    assert (s.best_step, s.stop_step, s.best_value) == (20, 50, 0.7)
    # min_delta: a 1% improvement does not count under min_delta = 0.05
    t = TrainLossPatience(patience=2, min_delta=0.05)
    assert [t.update(i, loss=v) for i, v in enumerate([1.0, 0.99, 0.98])] == [False, False, True]
    assert t.best_step == 0


def test_threshold_rule_needs_consecutive_hits_and_min_step():
    s = EvidenceStopping(patience=2, min_step=5)
    seq = [(0, 1.0), (1, 1.0), (5, 0.5), (6, -0.1), (7, 0.2), (8, 0.3)]
    assert [s.update(t, eb=v) for t, v in seq] == [False, False, False, False, False, True]
    assert (s.best_step, s.stop_step) == (7, 8)


def test_replay_equals_live_updates_and_never_sees_the_future():
    rows = [{"step": i, "loss": 1.0 / (i + 1), "heldout_loss": (i - 5) ** 2} for i in range(20)]
    live = OracleStopping(patience=3)
    for r in rows:
        if live.update(r["step"], **{k: v for k, v in r.items() if k != "step"}):
            break
    again = replay(OracleStopping(patience=3), rows)
    assert (again.best_step, again.stop_step) == (live.best_step, live.stop_step) == (5, 8)
    assert OracleStopping.uses_heldout and not PathLOOStopping.uses_heldout
    assert oracle_step([r["step"] for r in rows], [r["heldout_loss"] for r in rows]) == 5


def test_missing_signal_and_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="needs the signal"):
        PathLOOStopping().update(1, loss=0.3)
    with pytest.raises(ConfigError, match="patience"):
        TrainLossPatience(patience=0)
    with pytest.raises(ConfigError, match="estimate"):
        PathLOOStopping(estimate="aic")
    with pytest.raises(ConfigError, match="batch_size"):
        null_gate_fraction(2)


def test_selected_step_without_firing_is_the_last_step():
    s = GateFractionStopping(batch_size=100)
    for t in range(4):
        s.update(t, gate_fraction=0.9)
    assert not s.should_stop and s.selected_step() == 3


def test_eb_criterion_equals_the_obvious_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    loss_fn = nn.functional.mse_loss
    from lmech.probes import grad_noise

    eb = eb_criterion(grad_noise(net, loss_fn, (x, y)))
    rows = []
    for i in range(40):
        net.zero_grad()
        loss_fn(net(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    G = torch.stack(rows).double()
    b, D = G.shape
    ref = 1.0 - b / D * sum(float(G[:, k].mean() ** 2 / (G[:, k].var(unbiased=True) + 1e-5)) for k in range(D))
    assert eb == pytest.approx(ref, rel=1e-6)


def test_gate_fraction_of_pure_noise_matches_the_null_fraction():
    # loss = output * target with target 1: per-example gradient = x_i, zero-mean Gaussian
    b, D = 32, 20_000
    g = torch.Generator().manual_seed(0)
    net = nn.Linear(D, 1, bias=False)
    x = torch.randn(b, D, generator=g)
    s = gradient_signals(net, lambda out, t: (out * t).mean(), x, torch.ones(b, 1))
    assert s["gate_fraction"] == pytest.approx(null_gate_fraction(b), abs=0.01)
    assert null_gate_fraction(10**6) == pytest.approx(math.erfc(1 / math.sqrt(2)), abs=1e-5)
    # b gbar^2 / sigma^2 = t^2 on b - 1 degrees of freedom: E t^2 = (b - 1) / (b - 3)
    assert s["eb"] == pytest.approx(1 - (b - 1) / (b - 3), abs=0.01)


def test_channel_noise_signal_on_a_recorded_run_is_bounded_by_the_smoother():
    from lmech.models import MLP
    from lmech.probes.gramian import PathRecorder, half_mse
    from lmech.probes.path_loo import path_loo

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = torch.sign(x[:, :1])
    y[:6] = -y[:6]
    torch.manual_seed(0)
    net = MLP(3, 1, width=32, depth=1)
    from lmech.experiments._signal import gd_step_size, initial_kernel

    lr = gd_step_size(initial_kernel(net, x), 0.3)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    rec = PathRecorder(net, x, y, x[:2])
    rec.start()
    stopper = ChannelNoiseStopping(patience=50)
    for step in range(1, 61):
        opt.zero_grad()
        half_mse(net(x), y).backward()
        opt.step()
        out = rec.step(lr)
        if step % 10 == 0:
            sig = channel_noise_signals(rec)
            stopper.update(step, **sig)
            assert sig["channel_noise_risk"] >= out["loss"] - 1e-12
    u, _ = rec.outputs()
    df_H = path_loo(rec.path.D, u.reshape(-1, 1), y).df
    assert df_H * 0.9 <= sig["channel_df"] <= 2 * df_H * 1.1   # tr H <= df_W <= 2 tr H (frozen kernel)
    assert stopper.best_step is not None and np.isfinite(stopper.best_value)
