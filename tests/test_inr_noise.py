"""inr-noise: the signal and grids, the Fourier-feature network, tiny real runs, validation."""

import math

import pytest
import torch

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.inr_noise import FourierFeatureMLP, grid, signal
from lmech.runs import load

TINY = {"resolution": 32, "steps": 40, "width": 16, "depth": 2, "n_features": 8, "eval_every": 10, "batch_size": 8}


def test_grid_and_signal():
    x = grid(4, 1)
    assert torch.allclose(x[:, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    assert torch.allclose(grid(4, 1, offset=0.5)[:, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert grid(5, 2).shape == (25, 2)
    u = signal(torch.tensor([[0.125]]))
    expected = math.sin(math.pi / 2) + 0.5 * math.sin(10 * math.pi / 8 + 1) + 0.25 * math.sin(26 * math.pi / 8 + 2)
    assert u.item() == pytest.approx(expected, rel=1e-6)
    assert signal(grid(8, 2)).shape == (64, 1)


def test_fourier_features_are_fixed_by_the_generator():
    a = FourierFeatureMLP(1, 8, 10.0, 16, 2, generator=torch.Generator().manual_seed(0))
    b = FourierFeatureMLP(1, 8, 10.0, 16, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.B, b.B) and a.B.std() > 3  # scale 10
    assert "B" not in dict(a.named_parameters())    # a buffer, not trained


@pytest.mark.parametrize("sets", [
    {"optimizer": "adamw"},
    {"optimizer": "poprisk", "alpha": "finite", "gate": "snr"},
    {"optimizer": "grokfast", "dim": 2, "resolution": 8},
])
def test_tiny_runs_log_and_report(tmp_path, sets):
    summary = run_experiment("inr-noise", {**TINY, **sets}, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    df = load(summary["id"], root=tmp_path, wide=True)
    assert df["step"].tolist() == [0, 10, 20, 30, 40]
    assert {"train_mse", "clean_mse", "interp_mse", "weight_norm"} <= set(df.columns)
    assert ("gate_mean" in df.columns) == (sets["optimizer"] == "poprisk")
    r = summary["result"]
    assert r["min_clean_mse"] == pytest.approx(df["clean_mse"].min())
    assert r["final_clean_mse"] == pytest.approx(df["clean_mse"].iloc[-1])
    assert r["noise_var"] == pytest.approx(0.25)
    assert (tmp_path / summary["id"] / "figures" / "inr.png").exists()


def test_quick_config_denoises_below_the_noise_floor(tmp_path):
    """The quick config (a few seconds): at its best point the fit beats the noisy targets."""
    summary = run_experiment("inr-noise", {}, seed=1, out=tmp_path, quick=True)
    assert summary["result"]["min_clean_mse"] < 0.75 * summary["result"]["noise_var"]
    assert all(row.passed for row in summary["checks"])


@pytest.mark.parametrize("sets, message", [
    ({"dim": 2, "resolution": 200}, "resolution must be <= 128"),
    ({"optimizer": "poprisk", "alpha": "finite", "batch_size": 256}, "alpha=finite needs batch_size <"),
    ({"dim": 3}, "is not one of 1, 2"),
])
def test_bad_configs_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        get("inr-noise").make_config({k: str(v) for k, v in sets.items()})
