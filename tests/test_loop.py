"""lmech.experiments.loop: the catalog's training loop, its Monitor, and the hash-neutral probes key."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from lmech import experiments
from lmech.errors import DivergedError
from lmech.experiments.loop import TrainingLoop, train
from lmech.runs import RunStore, load
from lmech.runs.provenance import HASH_NEUTRAL, config_hash


def _linear_loop(probes="none", steps=30):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []

    def loss(step):
        idx = torch.randperm(64, generator=gen)[:16]
        value = (net(x[idx]) - y[idx]).square().mean()
        losses.append(float(value.detach()))
        return value

    def evaluate(step):
        with torch.no_grad():
            return {"train_mse": float((net(x) - y).square().mean())}

    loop = TrainingLoop(net, opt, steps, 10, loss, evaluate, watch="train_mse", probes=probes,
                        probe_batch=(x, y), probe_loss=torch.nn.functional.mse_loss)
    return loop, losses


def test_the_monitor_inside_does_not_change_training(tmp_path):
    store = RunStore(tmp_path)
    out = {}
    for probes in ("none", "economy"):
        loop, losses = _linear_loop(probes)
        with store.create("loop-test", {"probes": probes}, 0) as run:
            last = train(run, loop)
        out[probes] = (losses, last, store.metrics(run.id, wide=True))
    assert out["none"][0] == out["economy"][0]           # the same minibatch losses, bit for bit
    assert out["none"][1] == out["economy"][1]
    plain, probed = out["none"][2], out["economy"][2]
    assert not any(c.startswith("sharpness/") for c in plain.columns)
    assert any(c.startswith("sharpness/") for c in probed.columns)
    assert np.array_equal(plain.dropna(subset=["train_mse"])["train_mse"].to_numpy(),
                          probed.dropna(subset=["train_mse"])["train_mse"].to_numpy())


def test_schedule_evaluates_every_eval_every_and_the_last_step(tmp_path):
    loop, losses = _linear_loop(steps=25)
    with RunStore(tmp_path).create("loop-test", {}, 0) as run:
        train(run, loop)
    steps = RunStore(tmp_path).metrics(run.id, wide=True)["step"].tolist()
    assert steps == [0, 10, 20, 25] and len(losses) == 25 and loop.stopped_at == 25


def test_early_stop_and_divergence(tmp_path):
    loop, _ = _linear_loop(steps=50)
    loop.on_eval = lambda step, metrics: step >= 20
    with RunStore(tmp_path).create("loop-test", {}, 0) as run:
        train(run, loop)
    assert loop.stopped_at == 20
    loop, _ = _linear_loop(steps=50)
    loop.loss = lambda step: loop.model(torch.ones(2, 4)).sum() * (math.nan if step == 3 else 1.0)
    with pytest.raises(DivergedError, match=r"at step 4 \(last finite at step 3\)"):
        train(RunStore(tmp_path).create("loop-test", {"n": 2}, 0), loop)
    loop, _ = _linear_loop(steps=50)
    loop.loss = lambda step: loop.model(torch.ones(2, 4)).sum() * (math.nan if step == 3 else 1.0)
    with RunStore(tmp_path).create("loop-test", {"n": 3}, 0) as run:  # the run records it as diverged
        train(run, loop)
    assert RunStore(tmp_path).status(run.id)["state"] == "diverged"


def test_probes_key_is_hash_neutral_at_none():
    cfg = dataclasses.asdict(experiments.get("grokking").make_config(None))
    assert cfg["probes"] == "none" and HASH_NEUTRAL["probes"] == "none"
    without = {k: v for k, v in cfg.items() if k != "probes"}
    assert config_hash("grokking", cfg, 0) == config_hash("grokking", without, 0)
    assert config_hash("grokking", {**cfg, "probes": "economy"}, 0) != config_hash("grokking", without, 0)
    # the id of a run the paper sweep stored before the key existed (results/grokking-paper)
    paper = experiments.get("grokking").make_config({"steps": 60000, "optimizer": "poprisk", "gate": "soft",
                                                     "alpha": 1.0})
    assert config_hash("grokking", dataclasses.asdict(paper), 0)[:12] == "fcfeaa586ab7"


def test_inr_noise_with_probes_from_the_config(tmp_path):
    tiny = {"steps": 20, "resolution": 16, "width": 8, "n_features": 4, "depth": 1, "eval_every": 10}
    plain = experiments.run_experiment("inr-noise", tiny, out=tmp_path)
    probed = experiments.run_experiment("inr-noise", {**tiny, "probes": "economy"}, out=tmp_path)
    assert plain["state"] == probed["state"] == "done"
    a, b = (load(s["id"], root=tmp_path, wide=True) for s in (plain, probed))
    assert "probe/loss" in b.columns and "probe/loss" not in a.columns
    assert np.array_equal(a["clean_mse"].dropna().to_numpy(), b["clean_mse"].dropna().to_numpy())
    assert plain["result"]["min_clean_mse"] == probed["result"]["min_clean_mse"]


def test_a_stopping_rule_stops_where_a_hand_written_loop_stops(tmp_path):
    """train() with a StoppingDriver == the stopping module's "any loop" example written out by hand."""
    from lmech.stopping import GateFractionStopping, gradient_signals

    loop, _ = _linear_loop(steps=200)
    net, (x, y) = loop.model, loop.probe_batch
    by_hand = GateFractionStopping(batch_size=64, factor=1.5, patience=2)
    fed = []
    for step in range(1, 201):
        loss = loop.loss(step - 1)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.optimizer.step()
        if step % 10 == 0:
            s = gradient_signals(net, torch.nn.functional.mse_loss, x, y)
            fed.append((step, s["gate_fraction"]))
            if by_hand.update(step, **s):
                break
    assert by_hand.should_stop and by_hand.stop_step < 200
    from lmech.stopping.driver import StoppingDriver

    loop, _ = _linear_loop(steps=200)
    loop.stopping = StoppingDriver(GateFractionStopping(batch_size=64, factor=1.5, patience=2), loop.model,
                                   torch.nn.functional.mse_loss, loop.probe_batch, rule="gate")
    with RunStore(tmp_path).create("loop-test", {"stopping": "gate"}, 0) as run:
        last = train(run, loop)
    df = RunStore(tmp_path).metrics(run.id, wide=True)
    assert loop.stopped_at == by_hand.stop_step == df["step"].max()
    assert loop.stop_result() == {"stop/rule": "gate", "stop/step": by_hand.stop_step,
                                  "stop/best_step": by_hand.best_step}
    assert df.dropna(subset=["stop/gate_fraction"])[["step", "stop/gate_fraction"]].values.tolist() == \
        [[float(s), g] for s, g in fed]
    assert last["train_mse"] == df["train_mse"].iloc[-1]


def test_the_path_rule_reads_a_recorder_that_followed_every_minibatch(tmp_path):
    """The path-LOO signal the loop feeds == a recorder stepped by hand with the same minibatches."""
    from lmech.probes.gramian import PathRecorder
    from lmech.stopping import PathLOOStopping
    from lmech.stopping.driver import StoppingDriver

    def run_loop(with_driver):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        picked = {}

        def loss(step):
            idx = picked["idx"] = torch.randperm(32, generator=gen)[:8]
            return (net(x[idx]) - y[idx]).square().mean()

        make = lambda: PathRecorder(net, x, y, x[:2], optimizer=opt, loss_scale=2.0)  # noqa: E731
        if with_driver:
            loop = TrainingLoop(net, opt, 30, 10, loss, lambda s: {"l": 0.0}, watch="l",
                                stopping=StoppingDriver(PathLOOStopping(patience=100), net, recorder=make,
                                                        batch_indices=lambda: picked["idx"]))
            with RunStore(tmp_path).create("loop-test", {"path": 1}, 0) as run:
                train(run, loop)
            df = RunStore(tmp_path).metrics(run.id, wide=True).dropna(subset=["stop/poprisk_loo"])
            return df[["step", "stop/poprisk_loo"]].values.tolist()
        rec, out = make(), []
        rec.start()
        for step in range(1, 31):
            value = loss(step - 1)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            scalars = rec.step(batch=picked["idx"])
            if step % 10 == 0:
                out.append([float(step), scalars["poprisk_loo"]])
        return out

    assert run_loop(True) == run_loop(False)
def test_step_fn_on_step_and_probe_prefix(tmp_path):
    """A hand-written SGD update (step_fn) trains exactly as torch.optim.SGD through the loop; on_step
    logs after each update; probe_prefix puts the Monitor's columns under the loop's name."""
    histories = {}
    for how in ("optimizer", "step_fn"):
        loop, losses = _linear_loop(probes="economy", steps=12)
        params = list(loop.model.parameters())
        loop.optimizer = torch.optim.SGD(params, lr=0.05)
        if how == "step_fn":
            inner, loop.optimizer = loop.loss, None

            def step_fn(step, inner=inner, params=params):
                value = inner(step)
                grads = torch.autograd.grad(value, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=-0.05)
                return value

            loop.step_fn, loop.loss = step_fn, None
        loop.on_step = lambda step, loss: {"minibatch_loss": loss} if step % 4 == 0 else None
        loop.probe_prefix, loop.probe_every = "arm/", 6
        with RunStore(tmp_path).create("loop-test", {"how": how}, 0) as run:
            train(run, loop)
        histories[how] = (losses, RunStore(tmp_path).metrics(run.id, wide=True))
    assert histories["optimizer"][0] == histories["step_fn"][0]
    df = histories["step_fn"][1]
    assert df.dropna(subset=["minibatch_loss"])["step"].tolist() == [0, 4, 8]
    assert df.dropna(subset=["minibatch_loss"])["minibatch_loss"].tolist() == histories["step_fn"][0][0:9:4]
    assert df.dropna(subset=["arm/probe/loss"])["step"].tolist() == [6, 12]
    assert not any(c.startswith("probe/") for c in df.columns)
