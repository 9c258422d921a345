"""The deep-linear catalog entry: its data, config validation and check rows (the quick run is in test_verify)."""

import numpy as np
import pytest

from lmech.experiments import get
from lmech.errors import ConfigError
from lmech.experiments.deep_linear import DeepLinearConfig, check, make_problem


def test_problem_is_exactly_whitened_and_teacher_has_the_given_spectrum():
    cfg = DeepLinearConfig(singular_values="1,4,2")
    x, y, u_mat, v_mat, s, teacher = make_problem(cfg, seed=0)
    np.testing.assert_allclose(x.numpy().T @ x.numpy() / cfg.n_samples, np.eye(cfg.d), atol=1e-12)
    np.testing.assert_allclose(s, [4.0, 2.0, 1.0])  # sorted, strongest first
    np.testing.assert_allclose(np.linalg.svd(teacher, compute_uv=False)[:3], s)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ teacher.T)


@pytest.mark.parametrize("sets,match", [
    ({"singular_values": "2,2"}, "distinct"),
    ({"u0": 0.4, "singular_values": "4,0.5"}, "u0 must be in"),
    ({"depths": "2,12"}, "depths must be in"),
    ({"width": 2}, "width must be"),
])
def test_bad_configs(sets, match):
    with pytest.raises(ConfigError, match=match):
        get("deep-linear").make_config(sets)


def test_unreached_half_time_is_a_failing_row():
    result = {"tolerance": 0.05, "singular_values": [2.0], "depths": [2],
              "aligned.L2.mode1.t_half_predicted": 1.0, "aligned.L2.mode1.t_half_measured": None,
              "random.mode1.t_half_predicted": 1.0, "random.mode1.t_half_measured": 1.01,
              "random.learning_order": [1], "drift.slope": 1.0, "drift.etas": [1e-3],
              "drift.eta0.001.predicted": 1.0, "drift.eta0.001.measured": 1.2}
    rows = {r.quantity: r for r in check(result)}
    assert not rows["t_1/2 depth 2, aligned, mode s=2"].passed
    assert rows["t_1/2 depth 2, random init, mode s=2"].passed
    assert not rows["balancedness drift at eta=0.001 (eta * ||C(t)||)"].passed


def test_probes_economy_on_every_gd_run_changes_no_measurement(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"d": 4, "singular_values": "4,2", "depths": "2", "u0": 1e-2, "eta": 0.01, "width": 8, "init_scale": 1e-2,
            "n_samples": 16, "drift_etas": "0.04,0.02", "drift_time": 0.2}
    _, probed = assert_probes_leave_training_unchanged("deep-linear", tiny, tmp_path, "probe/loss")
    assert {"aligned_L2/probe/loss", "random/probe/loss", "drift_eta0.04/probe/loss"} <= set(probed.columns)
