"""lazy-rich: the centered model, slopes, tiny runs, the quick config, validation."""

import math

import pytest
import torch

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.lazy_rich import Centered, slope
from lmech.runs import load

TINY = {"widths": "8,16,32", "fit_min_width": 8, "alphas": "1,2,4", "alpha_width": 16, "base_width": 8,
        "train_steps": 20, "n_train": 32, "n_probe": 8}


def test_centered_model_starts_at_zero_and_scales_with_alpha():
    net = torch.nn.Linear(3, 1)
    f = Centered(net, alpha=4.0)
    x = torch.randn(5, 3)
    assert torch.equal(f(x), torch.zeros(5, 1))
    assert [n for n, _ in f.named_parameters()] == ["net.weight", "net.bias"]  # the frozen copy is not a parameter
    with torch.no_grad():
        net.bias += 1.0
    assert torch.allclose(f(x), torch.full((5, 1), 4.0))


def test_slope_of_a_power_law():
    assert slope([1, 2, 4, 8], [3 * n ** -0.5 for n in (1, 2, 4, 8)]) == pytest.approx(-0.5)
    assert math.isnan(slope([1, 2], [1.0, 0.0]))


def test_tiny_run_logs_both_sweeps(tmp_path):
    summary = run_experiment("lazy-rich", TINY, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    df = load(summary["id"], root=tmp_path, wide=True)
    expected = {"width/ntk/feature_change", "width/mup/kernel_distance", "alpha/weight_change/layers.0.weight"}
    assert expected <= set(df.columns)
    r = summary["result"]
    assert r["widths"] == [8, 16, 32] and r["alphas"] == [1.0, 2.0, 4.0]
    assert all(math.isfinite(r[f"{p}.slope.feature_change"]) for p in ("ntk", "mup"))
    assert len(summary["checks"]) == 8
    assert r["ntk.slope.feature_change"] == pytest.approx(r["ntk.slope_all_widths.feature_change"])  # all fitted
    assert (tmp_path / summary["id"] / "figures" / "lazy-rich.png").exists()


def test_quick_config_passes(tmp_path):
    """The quick config: NTK parameterization gets lazier with width, muP does not, weights ~ 1/alpha."""
    summary = run_experiment("lazy-rich", {}, seed=0, out=tmp_path, quick=True)
    assert summary["state"] == "done", summary["message"]
    failed = [c for c in summary["checks"] if not c.passed]
    assert not failed, failed


@pytest.mark.parametrize("sets, message", [
    ({"widths": "64,128"}, "at least 3"),
    ({"alphas": "1,0,2"}, "positive"),
    ({"n_probe": 1000}, "n_probe"),
    ({"widths": "64,128,256,1024"}, "fit_min_width"),
    ({"widths": "64,x,128"}, "comma-separated"),
])
def test_bad_config_is_refused(sets, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        get("lazy-rich").make_config(sets)


def test_probes_economy_on_every_network_changes_no_measurement(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    _, probed = assert_probes_leave_training_unchanged("lazy-rich", TINY, tmp_path, "probe/loss")
    assert {"ntk/w8/probe/loss", "mup/w32/probe/loss", "alpha4/probe/loss"} <= set(probed.columns)
