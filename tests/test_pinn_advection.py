"""pinn-advection: the residual against closed forms, a tiny real run, validation."""

import math

import pytest
import torch
from torch import nn

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.pinn_advection import PINN, exact, residual
from lmech.runs import load

TINY = {"steps": 30, "width": 8, "depth": 2, "n_collocation": 64, "batch_size": 16, "n_ic": 16, "n_bc": 8,
        "eval_every": 10}


class Closed(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


def test_residual_of_closed_forms():
    x, t = torch.rand(50, dtype=torch.float64) * 6, torch.rand(50, dtype=torch.float64)
    zero = residual(Closed(lambda x, t: exact(x, t, 5.0)), x, t, 5.0)
    assert zero.abs().max() < 1e-12                       # the exact solution solves the PDE
    r = residual(Closed(lambda x, t: x * t + t ** 2), x, t, 5.0)
    torch.testing.assert_close(r, x + 2 * t + 5.0 * t)    # u_t + 5 u_x for u = x t + t^2


def test_pinn_scales_inputs():
    net = PINN(width=8, depth=1, activation="tanh")
    assert net(torch.zeros(3), torch.zeros(3)).shape == (3,)


@pytest.mark.parametrize("sets", [{"optimizer": "adamw"}, {"optimizer": "poprisk", "alpha": "finite"}])
def test_tiny_run(tmp_path, sets):
    summary = run_experiment("pinn-advection", {**TINY, **sets}, seed=0, out=tmp_path)
    assert summary["state"] == "done", summary["message"]
    df = load(summary["id"], root=tmp_path, wide=True)
    assert df["step"].tolist() == [0, 10, 20, 30]
    assert {"rel_l2", "loss", "loss_residual", "loss_ic", "loss_bc"} <= set(df.columns)
    assert df["rel_l2"].iloc[0] > 0.5                     # an untrained network is far from sin(x - 5t)
    r = summary["result"]
    assert r["min_rel_l2"] == pytest.approx(df["rel_l2"].min())
    assert (r["step_to_target"] is None) == (r["min_rel_l2"] > 0.40)
    assert (tmp_path / summary["id"] / "figures" / "pinn.png").exists()


def test_stop_at_target_stops(tmp_path):
    sets = {**TINY, "target_rel_l2": 10.0, "stop_at_target": True}  # reached at step 0
    summary = run_experiment("pinn-advection", sets, seed=0, out=tmp_path)
    assert summary["result"]["step_to_target"] == 0 and summary["result"]["steps_run"] == 0


@pytest.mark.parametrize("sets, message", [
    ({"optimizer": "poprisk", "alpha": "finite", "batch_size": 5000}, "alpha=finite needs batch_size <"),
    ({"beta": -1}, "beta must be positive"),
    ({"activation": "relu"}, "is not one of tanh"),
])
def test_bad_configs_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        get("pinn-advection").make_config({k: str(v) for k, v in sets.items()})
