"""The signal-channel / reservoir catalog entries (coupling, label-noise, double-descent,
grokking-channel): small real configurations in the normal suite, the full ones marked slow."""

from __future__ import annotations

import math

import pytest
import torch

from lmech.experiments import ConfigError, get, run_experiment
from lmech.experiments.signal_runs import binary_task
from lmech.runs import RunStore


def _passed(summary) -> dict[str, bool]:
    return {c.quantity: c.passed for c in summary["checks"]}


def test_coupling_quick_passes_its_checks(store_root):
    s = run_experiment("coupling", quick=True, out=store_root)
    assert s["state"] == "done", s["message"]
    assert all(_passed(s).values()), s["checks"]
    assert (store_root / s["id"] / "figures" / "coupling.png").exists()
    r = s["result"]
    assert r["rich_alignment_final"] > r["rich_alignment_init"]      # the kernel learned the target


def test_label_noise_quick_logs_the_four_cells(store_root):
    s = run_experiment("label-noise", quick=True, out=store_root, sets=["noise=0.3"])
    assert s["state"] == "done", s["message"]
    checks = _passed(s)
    assert checks["corr(A dU_S, dU_Q) (Thm 5.1)"]
    assert checks["noise reservoir fraction - signal reservoir fraction (first readout)"]
    metrics = RunStore(store_root).metrics(s["id"], wide=True)
    for col in ("signal_channel", "signal_reservoir", "noise_channel", "noise_reservoir", "poprisk_loo",
                "poprisk_gcv", "poprisk_ustat",
                "heldout_noisy_loss", "test_error"):
        assert col in metrics.columns
    # the cells partition the energies: channel + reservoir = total, the same at every readout
    rows = metrics.dropna(subset=["noise_channel"])
    total = rows["noise_channel"] + rows["noise_reservoir"]
    assert float(total.max() - total.min()) < 1e-6 * float(total.max())
    # the population-risk estimate is logged at every record, not only at readouts
    assert metrics["poprisk_loo"].notna().sum() > len(rows)


@pytest.mark.parametrize("optimizer,extra", [("sgd", ["batch_size=32"]), ("adam", ["lr=3e-3"]),
                                             ("poprisk", ["lr=3e-3"])])
def test_label_noise_runs_with_each_optimizer(store_root, optimizer, extra):
    sets = [f"optimizer={optimizer}", "steps=40", "readout_every=20", "n_train=64", "n_query=32", "width=32", *extra]
    s = run_experiment("label-noise", quick=True, out=store_root, sets=sets)
    assert s["state"] == "done", s["message"]
    assert math.isfinite(s["result"]["coupling_corr"])


def test_double_descent_small(store_root):
    s = run_experiment("double-descent", quick=True, out=store_root, sets=["steps=600"])
    assert s["state"] == "done", s["message"]
    r = s["result"]
    assert r["widths"] == [1, 6, 64] and len(r["noise_transfer"]) == 3
    assert (store_root / s["id"] / "figures" / "double_descent.png").exists()


def test_grokking_channel_small(store_root):
    sets = ["steps=200", "window=50", "n_train=100", "n_query=50", "width=32"]
    s = run_experiment("grokking-channel", quick=True, out=store_root, sets=sets)
    assert s["state"] == "done", s["message"]
    r = s["result"]
    assert len(r["signal_transfer"]) == 4 and all(-1 <= v <= 1 for v in r["signal_transfer"][1:])
    assert all(0 <= v <= 1 for v in r["signal_channel_fraction"][1:])


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="noise"):
        get("label-noise").make_config(["noise=0.7"])
    with pytest.raises(ConfigError, match="batch_size"):
        get("label-noise").make_config(["batch_size=-1"])
    with pytest.raises(ConfigError, match="optimizer=sgd needs"):
        get("label-noise").make_config(["optimizer=sgd"])
    with pytest.raises(ConfigError, match="widths"):
        get("double-descent").make_config(["widths=8,4"])
    with pytest.raises(ConfigError, match="every"):
        get("coupling").make_config(["every=3"])


def test_binary_task_noise_is_exact():
    d = binary_task("digits", n_train=200, n_query=50, noise=0.25, seed=0)
    assert int((d.y != d.y_clean).sum()) == 50
    assert d.x_query.shape[0] == 50 and torch.equal(d.y_query, d.y_test[:50])
    flipped = float((d.y_test_noisy != d.y_test).float().mean())
    assert abs(flipped - 0.25) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coupling", "double-descent", "grokking-channel"])
def test_full_configuration(store_root, name):
    s = run_experiment(name, out=store_root)
    assert s["state"] == "done", s["message"]


@pytest.mark.parametrize("name, sets, column", [
    ("label-noise", {"steps": 40, "readout_every": 20}, "probe/loss"),
    ("coupling", {"steps": 40, "readout_every": 20, "lazy_steps": 20}, "lazy/probe/loss"),
    ("double-descent", {"steps": 40, "widths": "1,2,4"}, "w4/probe/loss"),
    ("grokking-channel", {"steps": 100, "window": 50, "n_train": 100, "n_query": 50, "width": 16}, "probe/loss"),
])
def test_probes_economy_changes_no_recorded_metric(tmp_path, name, sets, column):
    from probes_parity import assert_probes_leave_training_unchanged

    _, probed = assert_probes_leave_training_unchanged(name, sets, tmp_path, column, quick=True)
    assert column in probed.columns
