"""lmech.probes.gramian: the path recorder against closed forms (linear models: frozen kernel),
slow obvious paths (per-step vs interval integration, per-example leave-one-out), and the
falsifiable checks that must hold on any run (dissipation identity shrinking with the step)."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import per_example_grads
from lmech.errors import MemoryBudgetError
from lmech.models import MLP
from lmech.optim import PopRiskAdamW
from lmech.optim.poprisk import leave_one_out_term
from lmech.probes.base import TrainState
from lmech.probes.gramian import (
    CUT_FRACTION,
    GramianProbe,
    PathRecorder,
    channel_split,
    frozen_gramian_eigenvalues,
    half_mse,
    optimizer_update,
)

DT = torch.float64
gramian_module = importlib.import_module("lmech.probes.gramian")


def test_doctests():
    assert doctest.testmod(gramian_module).failed == 0


def _linear_problem(n=12, d=5, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    xq = torch.randn(m, d, generator=g, dtype=DT)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    return model, x, y, xq


def _train(model, rec, x, y, opt, steps, every=1, lr=None):
    rec.start()
    out = None
    for k in range(1, steps + 1):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        opt.step()
        if k % every == 0:
            out = rec.step(lr, steps=every)
    return out


def _features(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


# -------------------------------------------------------------------------------------------------
# Frozen kernel: a linear model, gradient descent, everything in closed form
# -------------------------------------------------------------------------------------------------


def test_linear_model_matches_closed_forms():
    model, x, y, xq = _linear_problem()
    n, lr, steps = x.shape[0], 0.05, 40
    X, Xq = _features(x), _features(xq)
    K, KQS = X @ X.T, Xq @ X.T
    rec = PathRecorder(model, x, y, xq)
    _train(model, rec, x, y, torch.optim.SGD(model.parameters(), lr=lr), steps, lr=lr)
    A = torch.eye(n, dtype=DT) - lr * K / n
    P = torch.linalg.matrix_power(A, steps)
    W = sum(lr * torch.linalg.matrix_power(A, k).T @ K @ torch.linalg.matrix_power(A, k) for k in range(steps))
    G = sum(lr * KQS @ torch.linalg.matrix_power(A, k) for k in range(steps))
    path = rec.path
    assert torch.allclose(path.P, P, atol=1e-10)
    assert torch.allclose(path.W, W, atol=1e-9)
    assert torch.allclose(path.G, G, atol=1e-9)
    assert torch.allclose(path.D, n * (torch.eye(n, dtype=DT) - P), atol=1e-9)   # D = n (I - P) for MSE
    # the linear model's residual evolves exactly by the propagator
    u_S, u_Q = rec.outputs()
    assert torch.allclose((u_S - y.reshape(-1)) / n, P @ path.g0, atol=1e-12)
    assert torch.allclose(u_Q - path.u_Q0, -G @ path.g0, atol=1e-10)


def test_interval_integration_equals_per_step_for_a_frozen_kernel():
    lr, steps = 0.05, 40
    paths = []
    for every in (1, 5, 20):
        model, x, y, xq = _linear_problem()
        rec = PathRecorder(model, x, y, xq)
        _train(model, rec, x, y, torch.optim.SGD(model.parameters(), lr=lr), steps, every=every, lr=lr)
        paths.append(rec.path)
    for p in paths[1:]:
        for name in ("P", "W", "D", "G"):
            assert torch.allclose(getattr(p, name), getattr(paths[0], name), atol=1e-9), name
        assert p.time == pytest.approx(paths[0].time)


def test_frozen_formula_coupling_invisibility_and_cut():
    model, x, y, xq = _linear_problem(n=16, d=6)
    n, lr, steps = x.shape[0], 0.002, 400
    rec = PathRecorder(model, x, y, xq)
    _train(model, rec, x, y, torch.optim.SGD(model.parameters(), lr=lr), steps, every=10, lr=lr)
    r = rec.readout(null_tol=1e-9)
    X, Xq = _features(x), _features(xq)
    lam = torch.linalg.eigvalsh(X @ X.T).flip(0).numpy()
    pred = frozen_gramian_eigenvalues(lam, rec.path.time, n)
    top = pred > 1e-6
    # discrete GD vs gradient flow: O(eta lambda / n) relative difference
    assert np.allclose(r.eigenvalues[top], pred[top], rtol=0.02)
    # K has rank d + 1 = 7 < n: an exact null space, invisible to the query outputs
    assert r.n_null == n - 7
    assert r.invisibility < 1e-9
    assert r.invisibility_bound_ok
    # A = G D^+ is kernel regression K_QS K^+ (on the realized displacement; operators on range K)
    KQS, K = Xq @ X.T, X @ X.T
    pred_A, actual = rec.predicted_test_displacement()
    u_S, _ = rec.outputs()
    krr = KQS @ torch.linalg.pinv(K, hermitian=True, rtol=1e-10) @ (u_S - rec.path.u_S0)
    assert torch.allclose(pred_A, krr, atol=1e-8) and torch.allclose(actual, krr, atol=1e-8)
    assert r.coupling_corr > 1 - 1e-10
    # the cut: channel iff lambda T / n >= 1 (frozen rule), away from the boundary
    lt = lam * rec.path.time / n
    clear = np.abs(lt - 1) > 0.05
    assert np.array_equal((r.split.channel)[clear], (lt >= 1)[clear])
    assert r.split.cutoff == pytest.approx(CUT_FRACTION * n / 2)


# -------------------------------------------------------------------------------------------------
# Falsifiable checks on a nonlinear model
# -------------------------------------------------------------------------------------------------


def _mlp_problem(seed=0, n=24, m=8, d=3, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    xq = torch.randn(m, d, generator=g, dtype=DT)
    if loss == "mse":
        y = torch.tanh(2 * x[:, :1])
    else:
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(seed)
    model = MLP(d, 1 if loss == "mse" else 3, width=16, depth=2, activation="tanh").double()
    return model, x, y, xq


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_dissipation_identity_error_shrinks_with_the_step(loss):
    errors = []
    for lr in (0.01, 0.005, 0.0025):
        model, x, y, xq = _mlp_problem(loss=loss)
        rec = PathRecorder(model, x, y, xq, loss=loss)
        steps = round(0.5 / lr)
        rec.start()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            rec.loss_fn(model(x), y).backward()
            opt.step()
            rec.step(lr)
        errors.append(rec.readout().dissipation_rel_err)
    # first-order error: halving the step (same time T) about halves it
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[0] == pytest.approx(0.5, abs=0.15)
    assert errors[2] / errors[1] == pytest.approx(0.5, abs=0.15)
    assert errors[2] <= 0.01


def test_leave_one_out_rates_match_per_example_gradients():
    model, x, y, xq = _mlp_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = PathRecorder(model, x, y, xq, optimizer=opt)
    rec.start()
    opt.zero_grad()
    half_mse(model(x), y).backward()
    opt.step()
    rec.step()                                     # Adam state now exists; the recorder measured new weights
    st = rec._state
    pi = optimizer_update(opt, model, lr=1e-2).pi.double()
    K = (st["J_S"] * pi) @ st["J_S"].T
    pop, train = rec._loo_rates(K.double(), st["dl"])
    grads = per_example_grads(model, half_mse, x, y)
    mean, loo = leave_one_out_term({"w": torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)})
    assert train == pytest.approx(float((pi * mean["w"] ** 2).sum()), rel=1e-9)
    assert pop == pytest.approx(float((pi * (mean["w"] ** 2 - loo["w"])).sum()), rel=1e-9)


def test_population_risk_path_sum_first_step():
    model, x, y, xq = _mlp_problem()
    rec = PathRecorder(model, x, y, xq, y_query=torch.tanh(2 * xq[:, :1]))
    rec.start()
    st = rec._state
    K = (st["J_S"] @ st["J_S"].T).double()
    pop, train = rec._loo_rates(K, st["dl"])
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    half_mse(model(x), y).backward()
    opt.step()
    out = rec.step(lr)
    assert out["poprisk_ustat_path"] == pytest.approx(st["phi"] - lr * pop)
    assert out["poprisk_ustat_gap"] == pytest.approx(lr * (train - pop))
    assert out["poprisk_ustat"] == pytest.approx(out["loss"] + out["poprisk_ustat_gap"])
    assert out["rate_train"] == pytest.approx(float(st["g"] @ K @ st["g"]))
    assert math.isfinite(out["rate_query"]) and math.isfinite(out["query_loss"])


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "poprisk", "adamw_wd", "sgd_l2", "adam_l2"])
def test_momentum_and_weight_decay_are_exact_for_a_linear_model(opt_name):
    model, x, y, xq = _linear_problem()
    n = x.shape[0]
    opt = {
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.02),
        "poprisk": lambda p: PopRiskAdamW(p, lr=0.02, gate="snr", weight_decay=0.0),
        "adamw_wd": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.5),
        "sgd_l2": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, weight_decay=0.3),
        "adam_l2": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.3),
    }[opt_name](model.parameters())
    rec = PathRecorder(model, x, y, xq, optimizer=opt)
    out = _train(model, rec, x, y, opt, 30)
    u_S, u_Q = rec.outputs()
    path = rec.path
    # a linear model has a constant Jacobian: the output-space recursion (momentum buffer, weight
    # decay as an affine forcing) is exact: U(T) - U(s) = -D g_s + F
    F_S = 0.0 if path.F_S is None else path.F_S
    F_Q = 0.0 if path.F_Q is None else path.F_Q
    assert (path.F_S is not None) == ("wd" in opt_name or "l2" in opt_name)
    assert torch.allclose(u_S - path.u_S0, -path.D @ path.g0 + F_S, atol=1e-10)
    assert torch.allclose(u_Q - path.u_Q0, -path.G @ path.g0 + F_Q, atol=1e-10)
    h = 0.0 if path.h is None else path.h
    assert torch.allclose((u_S - y.reshape(-1)) / n, path.P @ path.g0 + h, atol=1e-10)
    r = rec.readout()
    assert r.coupling_corr > 0.9999 and r.response_rel_err < 1e-8
    assert out["lin_error"] < 1e-8
    assert r.invisibility_bound_ok is None or "wd" in opt_name  # the bound needs momentum-free updates


def test_minibatch_steps_keep_D_and_coupling_exact():
    model, x, y, xq = _linear_problem()
    n, lr = x.shape[0], 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = PathRecorder(model, x, y, xq, optimizer=opt)
    rec.start()
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        idx = torch.randperm(n, generator=gen)[:4]
        opt.zero_grad()
        half_mse(model(x[idx]), y[idx]).backward()
        opt.step()
        rec.step(lr, batch=idx)
    path = rec.path
    u_S, u_Q = rec.outputs()
    assert torch.allclose(path.D, n * (torch.eye(n, dtype=DT) - path.P), atol=1e-9)
    assert torch.allclose(u_S - path.u_S0, -path.D @ path.g0, atol=1e-10)
    assert torch.allclose(u_Q - path.u_Q0, -path.G @ path.g0, atol=1e-10)


def test_lin_error_detects_a_wrong_loss_scale():
    model, x, y, xq = _mlp_problem()
    rec = PathRecorder(model, x, y, xq)
    rec.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()        # = 2/o Phi with o = 1: twice the recorder's loss
    opt.step()
    assert rec.step(0.01)["lin_error"] > 0.4
    model, x, y, xq = _mlp_problem()
    rec = PathRecorder(model, x, y, xq, loss_scale=2.0)
    rec.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert rec.step(0.01)["lin_error"] < 0.01


def test_windows_restart_and_match_a_fresh_recorder():
    model, x, y, xq = _linear_problem()
    lr = 0.05
    rec = PathRecorder(model, x, y, xq, window=10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _train(model, rec, x, y, opt, 20, lr=lr)
    w = rec.last_window
    assert w.steps == 10 and w.start_step == 10 and w.u_S_end is not None
    # a fresh recorder started at step 10 accumulates the same window
    model2, *_ = _linear_problem()
    rec2 = PathRecorder(model2, x, y, xq)
    opt2 = torch.optim.SGD(model2.parameters(), lr=lr)
    for _ in range(10):
        opt2.zero_grad()
        half_mse(model2(x), y).backward()
        opt2.step()
    _train(model2, rec2, x, y, opt2, 10, lr=lr)
    assert torch.allclose(w.W, rec2.path.W, atol=1e-9) and torch.allclose(w.G, rec2.path.G, atol=1e-9)
    rw = rec.readout(w)
    assert rw.dissipation_rel_err < 0.05


def test_probe_protocol():
    model, x, y, xq = _mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    probe = GramianProbe(PathRecorder(model, x, y, xq, optimizer=opt), readout_every=2)
    assert probe.measure(TrainState(model, half_mse, (x, y), step=0, optimizer=opt)) == {}
    outs = []
    for step in (3, 6):
        for _ in range(3):
            opt.zero_grad()
            half_mse(model(x), y).backward()
            opt.step()
        outs.append(probe.measure(TrainState(model, half_mse, (x, y), step=step, optimizer=opt)))
    assert "poprisk_loo" in outs[0] and "readout/coupling_corr" not in outs[0]
    assert "readout/coupling_corr" in outs[1] and outs[1]["spectrum"].shape == (x.shape[0],)
    assert probe.recorder.path.steps == 6


# -------------------------------------------------------------------------------------------------
# Split rule, memory budget, bad input
# -------------------------------------------------------------------------------------------------


def test_channel_split_rules():
    W = torch.diag(torch.tensor([10.0, 4.0, 1.0, 1e-3], dtype=DT))
    s = channel_split(W, "frozen", saturation=5.0)
    assert s.n_channel == 1 and s.gap_ratio == pytest.approx(2.5)
    s = channel_split(W, "relative", saturation=5.0, rel_cutoff=0.05)
    assert s.n_channel == 3 and s.cutoff == pytest.approx(0.5)
    s = channel_split(W, 2.0, saturation=5.0)
    assert s.rule == "absolute" and s.n_channel == 2
    e = s.energies(torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=DT))
    assert e["channel"] == pytest.approx(2.0) and e["reservoir"] == pytest.approx(4.0)
    assert e["channel_soft"] == pytest.approx(1 + 0.8 + 4 * 0.2)
    with pytest.raises(ValueError, match="cutoff must be"):
        channel_split(W, "median", saturation=1.0)
    with pytest.raises(ValueError, match="rel_cutoff"):
        channel_split(W, "relative", saturation=1.0, rel_cutoff=2.0)


def test_memory_budget_refuses_before_allocating():
    model = MLP(20, 1, width=512, depth=1)                       # 11k parameters
    x, y, xq = torch.randn(256, 20), torch.randn(256, 1), torch.randn(256, 20)
    rec = PathRecorder(model, x, y, xq)
    est = rec.memory_estimate()
    P = sum(p.numel() for p in model.parameters())
    assert est >= 4 * P * (256 + 256) + 4 * P * 256
    with pytest.raises(MemoryBudgetError, match="path recorder"):
        PathRecorder(model, x, y, xq, max_bytes=est - 1)


def test_bad_input():
    model, x, y, xq = _mlp_problem()
    with pytest.raises(ValueError, match="loss must be"):
        PathRecorder(model, x, y, xq, loss="hinge")
    with pytest.raises(ValueError, match="MSE targets must match"):
        PathRecorder(model, x, y.repeat(1, 2), xq)
    with pytest.raises(ValueError, match="integer class targets"):
        PathRecorder(model, x, y, xq, loss="cross_entropy")
    rec = PathRecorder(model, x, y, xq)
    with pytest.raises(RuntimeError, match="start"):
        rec.step(0.1)
    rec.start()
    with pytest.raises(ValueError, match="pass lr"):
        rec.step()
    with pytest.raises(ValueError, match="indices into the training set"):
        rec.step(0.1, batch=torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="Nesterov"):
        optimizer_update(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), model)
    with pytest.raises(ValueError, match="unsupported optimizer"):
        optimizer_update(torch.optim.Adagrad(model.parameters(), lr=0.1), model)


def test_probe_in_a_monitor_leaves_training_unchanged():
    from lmech.monitor import Monitor

    def train(with_monitor: bool):
        model, x, y, xq = _mlp_problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        mon = None
        if with_monitor:
            probe = GramianProbe(PathRecorder(model, x, y, xq), readout_every=2)
            mon = Monitor(model, half_mse, (x, y), probes=[probe], every=2, budget_mb=None)
        losses = []
        for step in range(7):
            opt.zero_grad()
            loss = half_mse(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if mon is not None:
                mon.step(step, optimizer=opt)
        return losses, mon

    plain, _ = train(False)
    monitored, mon = train(True)
    assert plain == monitored
    steps = [s for s, _ in mon.history.records]
    assert steps == [0, 2, 4, 6]
    records = dict(mon.history.records)
    assert "gramian/poprisk_loo" in records[2] and "gramian/readout/coupling_corr" not in records[2]
    assert "gramian/readout/coupling_corr" in records[4]      # every second measurement reads out
