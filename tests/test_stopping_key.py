"""The ``stopping`` config key of the catalog entries on the training loop (inr-noise, pinn-advection,
quanta, label-noise, double-descent, prune-reservoir): hash-neutral at none, a stopped run is the plain run cut at the stopping step, and the stop
step is the one the stand-alone criterion (and the Lightning callback) gives on the run's signals."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmech import experiments
from lmech.errors import ConfigError
from lmech.experiments.stopping_keys import NEUTRAL, build_criterion
from lmech.runs import load
from lmech.runs.provenance import HASH_NEUTRAL, config_hash
from lmech.stopping import OracleStopping, replay
from lmech.stopping.driver import StoppingDriver

INR = {"resolution": 32, "steps": 60, "width": 16, "depth": 2, "n_features": 8, "eval_every": 5, "batch_size": 8}
PINN = {"steps": 60, "width": 8, "depth": 2, "n_collocation": 64, "batch_size": 16, "n_ic": 16, "n_bc": 8,
        "eval_every": 5}
QUANTA = {"n_tasks": 8, "n_bits": 8, "k": 2, "width": 16, "steps": 200, "n_eval": 20, "test_per_task": 10,
          "batch_size": 32}
LABEL = {"n_train": 64, "n_query": 32, "width": 32, "steps": 200, "readout_every": 10}
LABEL_SGD = {**LABEL, "optimizer": "sgd", "batch_size": 16, "step_size": 0.2}

# per entry, rules whose tiny run fires before or at the cap (measured while writing this)
CASES = [
    ("inr-noise", INR, {"stopping": "path_loo", "stop_patience": 2, "stop_min_delta": 0.05}),
    ("inr-noise", INR, {"stopping": "channel_noise", "stop_patience": 2, "stop_min_delta": 0.05}),
    ("inr-noise", INR, {"stopping": "gate", "stop_patience": 2, "stop_factor": 2.0}),
    ("pinn-advection", PINN, {"stopping": "train_loss", "stop_patience": 2}),
    ("pinn-advection", PINN, {"stopping": "gate", "stop_patience": 2, "stop_factor": 2.0}),
    ("quanta", QUANTA, {"stopping": "train_loss", "stop_patience": 2, "stop_min_delta": 0.05}),
    ("quanta", QUANTA, {"stopping": "gate", "stop_patience": 2, "stop_factor": 2.0}),
    ("label-noise", LABEL, {"stopping": "path_loo", "stop_patience": 2}),
    ("label-noise", LABEL, {"stopping": "path_gcv", "stop_patience": 2}),
    ("label-noise", LABEL, {"stopping": "channel_noise", "stop_patience": 2}),
    ("label-noise", LABEL, {"stopping": "gate", "stop_patience": 2, "stop_factor": 2.0}),
    ("label-noise", LABEL, {"stopping": "evidence", "stop_patience": 2}),
    ("label-noise", LABEL_SGD, {"stopping": "path_loo", "stop_patience": 2}),
]


def _signals(df):
    """The rows the rule was fed: step and the ``stop/`` signal columns, without the decision columns."""
    cols = [c for c in df.columns if c.startswith("stop/") and c not in ("stop/step", "stop/best_step")]
    fed = df.dropna(subset=cols)
    return [{"step": int(r["step"]), **{c[5:]: float(r[c]) for c in cols}} for _, r in fed.iterrows()]


def _lightning_stop(criterion, rows):
    """Drive the Lightning StoppingCallback with the logged signals as a trainer's callback metrics."""
    from lmech.integrations.stopping_lightning import StoppingCallback

    cb = StoppingCallback(criterion)
    for row in rows:
        trainer = SimpleNamespace(global_step=row["step"], should_stop=False,
                                  callback_metrics={k: torch.tensor(v) for k, v in row.items() if k != "step"})
        cb.on_train_batch_end(trainer, None, None, None, 0)
        if trainer.should_stop:
            break
    return cb.criterion


@pytest.mark.parametrize("name, tiny, rule", CASES, ids=[f"{c[0]}-{c[2]['stopping']}" for c in CASES])
def test_a_stopped_run_is_the_plain_run_cut_at_the_rules_step(tmp_path, name, tiny, rule):
    plain = experiments.run_experiment(name, tiny, out=tmp_path)
    stopped = experiments.run_experiment(name, {**tiny, **rule}, out=tmp_path)
    # never fires (min_step past the cap) but is fed, and logs, every evaluation: the brute-force reference
    fed = experiments.run_experiment(name, {**tiny, **rule, "stop_min_step": tiny["steps"] + 1}, out=tmp_path)
    assert plain["state"] == stopped["state"] == fed["state"] == "done", (stopped["message"], fed["message"])
    r = stopped["result"]
    step = r["stop/step"]
    assert r["stop/rule"] == rule["stopping"] and step is not None and 0 < step <= tiny["steps"]
    assert fed["result"]["stop/step"] is None and "stop/rule" not in plain["result"]

    a, b, c = (load(s["id"], root=tmp_path, wide=True) for s in (plain, stopped, fed))
    assert b["step"].max() == step and b.loc[b["step"] == step, "stop/step"].item() == step
    assert b.loc[b["step"] == step, "stop/best_step"].item() == r["stop/best_step"]
    training = [col for col in a.columns if col != "step"]
    assert not any(col.startswith("stop/") for col in training)
    cut = a[a["step"] <= step].reset_index(drop=True)
    assert cut[training].equals(b[training].reset_index(drop=True))   # bit for bit up to the stop
    assert a[training].equals(c[training])                            # feeding the rule changes nothing

    cfg = experiments.get(name).make_config({**tiny, **rule})
    size = {"inr-noise": 32, "pinn-advection": 16, "quanta": 512, "label-noise": 64}[name]
    rows = _signals(c)
    assert [row for row in rows if row["step"] <= step] == _signals(b)
    alone = replay(build_criterion(cfg, size), rows)
    assert (alone.stop_step, alone.best_step) == (step, r["stop/best_step"])
    pytest.importorskip("lightning")
    cb = _lightning_stop(build_criterion(cfg, size), rows)
    assert (cb.stop_step, cb.best_step) == (step, r["stop/best_step"])


@pytest.mark.parametrize("name", ["inr-noise", "pinn-advection", "quanta", "label-noise", "double-descent",
                                  "prune-reservoir"])
def test_the_keys_are_hash_neutral_at_none(name):
    exp = experiments.get(name)
    cfg = dataclasses.asdict(exp.make_config(None))
    assert {k: cfg[k] for k in NEUTRAL} == NEUTRAL and all(HASH_NEUTRAL[k] == v for k, v in NEUTRAL.items())
    without = {k: v for k, v in cfg.items() if k not in NEUTRAL}
    assert config_hash(name, cfg, 0) == config_hash(name, without, 0)
    assert config_hash(name, {**cfg, "stopping": "gate"}, 0) != config_hash(name, without, 0)


def test_run_ids_of_stored_runs_do_not_change():
    """Hashes computed before the keys existed (default config seed 0, quick config seed 3): on main
    for the first three, on the merge branch at f9c3309 for the others."""
    before = {"inr-noise": ("c38360828711", "179ceaa96ed1"), "pinn-advection": ("ce26a3aa28b5", "08aeaeb51630"),
              "quanta": ("830e1e02814f", "56e4d4cfd1cc"), "label-noise": ("9a9eb7769109", "83fb8605f745"),
              "double-descent": ("465fd8ae6fa8", "1adb5a2591d0"),
              "prune-reservoir": ("12efe2a273f8", "c8c5b7027700")}
    for name, (default, quick) in before.items():
        exp = experiments.get(name)
        assert config_hash(name, dataclasses.asdict(exp.make_config(None)), 0)[:12] == default, name
        assert config_hash(name, dataclasses.asdict(exp.make_config(None, quick=True)), 3)[:12] == quick, name


@pytest.mark.parametrize("name, sets, message", [
    ("inr-noise", {"stopping": "oracle"}, "is not one of none, path_loo"),
    ("inr-noise", {"stop_patience": "3"}, "stop_patience has no effect with stopping=none"),
    ("inr-noise", {"stopping": "gate", "stop_min_delta": "0.1"}, "stop_min_delta has no effect with stopping=gate"),
    ("inr-noise", {"stopping": "evidence", "stop_factor": "2"}, "stop_factor has no effect with stopping=evidence"),
    ("inr-noise", {"stopping": "path_loo", "stop_patience": "0"}, "patience must be a positive integer"),
    ("inr-noise", {"stopping": "path_loo", "dim": "2", "resolution": "64"}, "at most 1024"),
    ("inr-noise", {"stopping": "path_loo", "optimizer": "grokfast"}, "not Grokfast"),
    ("pinn-advection", {"stopping": "path_loo"}, "stopping=path_loo is not available here (the path rules"),
    ("quanta", {"stopping": "channel_noise"}, "there is no fixed training set"),
    ("quanta", {"stopping": "train_loss", "stop_min_delta": "1.5"}, "min_delta (relative) must be in [0, 1)"),
    ("label-noise", {"stop_min_step": "40"}, "stop_min_step has no effect with stopping=none"),
    ("label-noise", {"stopping": "oracle"}, "is not one of none, path_loo"),
    ("double-descent", {"stopping": "gate", "stop_min_delta": "0.1"}, "stop_min_delta has no effect with stopping=gate"),
    ("prune-reservoir", {"stopping": "path_gcv"}, "stopping=path_gcv is not available here (the usage is recorded"),
])
def test_bad_stopping_keys_are_refused(name, sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        experiments.get(name).make_config(sets)


def test_the_oracle_is_refused_as_a_loop_rule():
    cfg = SimpleNamespace(stopping="oracle", stop_patience=5, stop_min_step=0, stop_min_delta=0.0, stop_factor=1.0)
    with pytest.raises(ConfigError, match="reads held-out data"):
        build_criterion(cfg)
    with pytest.raises(ConfigError, match="reads held-out data"):
        StoppingDriver(OracleStopping(), torch.nn.Linear(2, 1))


def test_stop_columns_hold_the_signals_the_rule_read(tmp_path):
    s = experiments.run_experiment("inr-noise", {**INR, "stopping": "path_loo", "stop_patience": 2,
                                                 "stop_min_delta": 0.05}, out=tmp_path)
    df = load(s["id"], root=tmp_path, wide=True)
    assert {"stop/poprisk_loo", "stop/poprisk_gcv", "stop/leverage"} <= set(df.columns)
    assert np.isnan(df.loc[df["step"] == 0, "stop/poprisk_loo"]).all()       # not fed at step 0
    assert np.isfinite(df.loc[df["step"] > 0, "stop/poprisk_loo"]).all()


def test_the_key_from_the_command_line(tmp_path):
    import subprocess
    import sys

    sets = [f"{k}={v}" for k, v in {**INR, "stopping": "path_loo", "stop_patience": 2, "stop_min_delta": 0.05}.items()]
    out = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "lmech.cli", "run", "inr-noise", *sum((["--set", s] for s in sets), []),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr            # 1: a check failed, the run finished
    from lmech.runs import RunStore

    store = RunStore(out)
    (run_id,) = store.runs()["id"].tolist()
    assert store.result(run_id)["stop/rule"] == "path_loo" and store.result(run_id)["stop/step"] == 50
    df = load(run_id, root=out, wide=True)
    assert df["step"].max() == 50 and df["stop/step"].dropna().tolist() == [50.0]


DOUBLE = {"widths": "1,6,64", "n_train": 64, "n_query": 32, "steps": 300, "every": 10}
DOUBLE_CASES = [{"stopping": "path_loo", "stop_patience": 3}, {"stopping": "channel_noise", "stop_patience": 3},
                {"stopping": "gate", "stop_patience": 3, "stop_factor": 2.0}]


def _table(df):
    """The per-width rows of a double-descent run (logged at step = width), without ``stop/`` columns."""
    cols = [c for c in df.columns if c != "step" and "/" not in c]
    return df[df["step"].isin([1, 6, 64])][["step", *cols]].dropna(axis=1, how="all").reset_index(drop=True)


@pytest.mark.parametrize("rule", DOUBLE_CASES, ids=[r["stopping"] for r in DOUBLE_CASES])
def test_double_descent_stops_each_width_where_its_rule_fires(tmp_path, rule):
    """Each width has its own rule; a stopped width's row is the row of the plain entry trained for
    exactly its stop step, feeding the rule changes nothing, and each width's stop step is the
    stand-alone criterion's (and the Lightning callback's) on that width's logged signals."""
    name, widths = "double-descent", [1, 6, 64]
    plain = experiments.run_experiment(name, DOUBLE, out=tmp_path)
    stopped = experiments.run_experiment(name, {**DOUBLE, **rule}, out=tmp_path)
    fed = experiments.run_experiment(name, {**DOUBLE, **rule, "stop_min_step": DOUBLE["steps"] + 1}, out=tmp_path)
    assert plain["state"] == stopped["state"] == fed["state"] == "done", (stopped["message"], fed["message"])
    r = stopped["result"]
    assert r["stop/rule"] == rule["stopping"] and "stop/rule" not in plain["result"]
    assert fed["result"]["stop/step"] == [None] * 3
    assert all(s is not None and 0 < s <= DOUBLE["steps"] and s % DOUBLE["every"] == 0 for s in r["stop/step"])

    a, b, c = (load(s["id"], root=tmp_path, wide=True) for s in (plain, stopped, fed))
    assert _table(a).equals(_table(c))                                     # feeding the rule changes nothing
    for step in sorted(set(r["stop/step"])):                               # the plain entry cut at the stop
        short = experiments.run_experiment(name, {**DOUBLE, "steps": step}, out=tmp_path)
        cut, rows = _table(load(short["id"], root=tmp_path, wide=True)), _table(b)
        at = [i for i, s in enumerate(r["stop/step"]) if s == step]
        assert cut.iloc[at].reset_index(drop=True).equals(rows.iloc[at][cut.columns].reset_index(drop=True))

    cfg = experiments.get(name).make_config({**DOUBLE, **rule})
    for i, width in enumerate(widths):
        _assert_the_rule_replays(cfg, DOUBLE["n_train"], f"w{width}/stop/", b, c, r["stop/step"][i],
                                 r["stop/best_step"][i])


def _assert_the_rule_replays(cfg, size, pre, stopped, fed, step, best_step):
    """The rows of ``pre`` signals the stopped run logged are the fed run's up to ``step``, and the
    stand-alone criterion and the Lightning callback fed the fed run's rows stop at ``step``."""
    cols = [col for col in fed.columns if col.startswith(pre) and col not in (pre + "step", pre + "best_step")]
    assert cols

    def signals(df):
        return [{"step": int(x["step"]), **{col[len(pre):]: float(x[col]) for col in cols}}
                for _, x in df.dropna(subset=cols).iterrows()]

    rows = signals(fed)
    assert [row for row in rows if row["step"] <= step] == signals(stopped)
    assert stopped[pre + "step"].dropna().tolist() == [step]
    alone = replay(build_criterion(cfg, size), rows)
    assert (alone.stop_step, alone.best_step) == (step, best_step)
    pytest.importorskip("lightning")
    cb = _lightning_stop(build_criterion(cfg, size), rows)
    assert (cb.stop_step, cb.best_step) == (step, best_step)


PRUNE = {"mlp_width": 32, "mlp_steps": 200, "cnn_channels": 8, "cnn_steps": 200, "n_train": 300, "sparsities": "0.5,0.8"}
PRUNE_CASES = [{"stopping": "gate", "stop_patience": 2, "stop_factor": 2.0}, {"stopping": "evidence", "stop_patience": 1},
               {"stopping": "train_loss", "stop_patience": 1, "stop_min_delta": 0.05}]


@pytest.mark.parametrize("rule", PRUNE_CASES, ids=[r["stopping"] for r in PRUNE_CASES])
def test_prune_reservoir_prunes_the_network_its_rule_stopped(tmp_path, rule):
    """Each task has its own rule; a stopped task's accuracies (dense and pruned, every method) are
    those of the plain entry trained for exactly its stop step, feeding the rule changes nothing,
    and each stop step is the stand-alone criterion's on the task's logged signals."""
    name = "prune-reservoir"
    plain = experiments.run_experiment(name, PRUNE, out=tmp_path)
    stopped = experiments.run_experiment(name, {**PRUNE, **rule}, out=tmp_path)
    fed = experiments.run_experiment(name, {**PRUNE, **rule, "stop_min_step": 201}, out=tmp_path)
    assert plain["state"] == stopped["state"] == fed["state"] == "done", (stopped["message"], fed["message"])
    r, tasks = stopped["result"], ("mlp-digits", "cnn-mnist1d")
    assert r["stop/rule"] == rule["stopping"] and "stop/rule" not in plain["result"]
    steps = {t: r["tasks"][t]["stop/step"] for t in tasks}
    assert any(s is not None for s in steps.values()) and all(s is None or 0 < s <= 200 for s in steps.values())
    measured = ("dense_test_acc", "dense_train_acc", "acc")
    for t in tasks:
        assert fed["result"]["tasks"][t]["stop/step"] is None
        assert {k: fed["result"]["tasks"][t][k] for k in measured} == {k: plain["result"]["tasks"][t][k] for k in measured}
    cut = {"mlp_steps": steps["mlp-digits"] or 200, "cnn_steps": steps["cnn-mnist1d"] or 200}
    short = experiments.run_experiment(name, {**PRUNE, **cut}, out=tmp_path)["result"]
    for t in tasks:
        assert {k: r["tasks"][t][k] for k in measured} == {k: short["tasks"][t][k] for k in measured}

    a, b, c = (load(s["id"], root=tmp_path, wide=True) for s in (plain, stopped, fed))
    training = [col for col in a.columns if col != "step"]
    assert a[training].equals(c[c["step"].isin(a["step"])][training].reset_index(drop=True))
    cfg = experiments.get(name).make_config({**PRUNE, **rule})
    for t in tasks:
        if steps[t] is not None:
            size = 300 if t == "cnn-mnist1d" else 512          # min(STOP_BATCH, training examples)
            _assert_the_rule_replays(cfg, size, f"{t}/stop/", b, c, steps[t], r["tasks"][t]["stop/best_step"])
