"""central-flows: the third-derivative term against finite differences, a tiny run, check rows."""

import pytest
import torch

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.central_flows import _grad_and_sharpness_grad, _set_flat, _flat, check, mse
from lmech.models import MLP


def test_grad_of_u_H_u_matches_finite_differences():
    torch.manual_seed(0)
    net = MLP(3, 2, width=5, depth=2, activation="tanh").double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    w = _flat(net)
    u = torch.randn(w.numel(), dtype=torch.float64)
    u /= u.norm()
    loss, g, s, gs = _grad_and_sharpness_grad(net, x, y, u)
    direction = torch.randn_like(w)
    eps = 1e-5
    vals = []
    for sign in (1, -1):
        _set_flat(net, w + sign * eps * direction)
        vals.append(_grad_and_sharpness_grad(net, x, y, u)[2])
    _set_flat(net, w)
    assert float(gs @ direction) == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-6)
    h = torch.autograd.functional.hessian(lambda f: _loss_at(net, f, x, y), w)
    assert s == pytest.approx(float(u @ h @ u), rel=1e-10)
    assert loss == pytest.approx(float(mse(net(x), y)))


def _loss_at(net, flat, x, y):
    from torch.func import functional_call
    shapes = {n: p.shape for n, p in net.named_parameters()}
    params, i = {}, 0
    for n, shp in shapes.items():
        k = int(torch.tensor(shp).prod())
        params[n] = flat[i:i + k].view(shp)
        i += k
    return mse(functional_call(net, params, (x,)), y)


def test_tiny_run_and_rows(tmp_path):
    s = run_experiment("central-flows", {"n_train": 20, "width": 6, "steps": 50, "eval_every": 10, "window": 4, "cf_dt": 1.0, "lanczos_tol": 1e-4},
                       seed=0, out=tmp_path)
    assert s["state"] == "done", s["message"]
    assert s["checks"] and all(isinstance(c.passed, bool) for c in s["checks"])
    assert not check({"window_steps": None})[0].passed
    good = {"window_steps": [100, 900], "cf_sharpness_max_rel": 0.001, "cf_sharpness_mean": 10.0,
            "gd_sharpness_mean": 10.3, "loss_median_rel_error": 0.1, "distance_ratio_median": 0.2}
    assert all(r.passed for r in check(good))
    assert not check({**good, "distance_ratio_median": 0.9})[-1].passed


def test_bad_config():
    with pytest.raises(ConfigError, match="cf_dt"):
        get("central-flows").make_config({"cf_dt": 2.0})


def test_probes_economy_on_gd_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"n_train": 20, "width": 6, "steps": 50, "eval_every": 10, "window": 4, "cf_dt": 1.0, "lanczos_tol": 1e-4}
    _, probed = assert_probes_leave_training_unchanged("central-flows", tiny, tmp_path, "gd/probe/loss")
    assert probed.dropna(subset=["gd/probe/loss"])["step"].tolist() == [10, 20, 30, 40, 50]
