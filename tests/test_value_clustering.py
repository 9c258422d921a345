"""value-clustering: the rescaled flow against the original flow, the limit-set helpers, the quick config."""

import numpy as np
import pytest

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.theory import value_clustering as vc
from lmech.theory.attention import attention_field


def test_rescaled_flow_is_the_original_flow_seen_through_exp_minus_tV():
    """Integrate x' = sum_j P_ij V x_j directly (no projection) and compare with e^{tV} z(t)."""
    v, phi = vc.symmetric_value_matrix([0.8, 0.3, -0.2], seed=3)
    x0 = np.random.default_rng(1).standard_normal((6, 3))
    t_max, dt = 1.0, 1e-3
    x = x0.copy()
    for _ in range(int(round(t_max / dt))):                      # RK4 on the original flow
        f = lambda y: attention_field(y, 1.0, "SA", v=v, project=False)  # noqa: E731
        k1 = f(x); k2 = f(x + dt / 2 * k1); k3 = f(x + dt / 2 * k2); k4 = f(x + dt * k3)  # noqa: E702
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    sim = vc.simulate_rescaled(x0, 1.0, v, t_max, dt, record_every=1000)
    lam, ph = np.linalg.eigh(v)
    x_from_z = ((sim.z[-1] @ ph) * np.exp(t_max * lam)) @ ph.T
    assert np.allclose(x_from_z, x, atol=1e-9)
    assert np.allclose(sim.u[-1], x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-9)


def test_helpers():
    pts = np.array([[0, 0], [1e-5, 0], [1, 0], [0, 1], [0.2, 0.2]])
    assert len(vc.group_points(pts, 1e-3)) == 4
    assert vc.hull_vertex_count(vc.group_points(pts, 1e-3)) == 3      # (0.2, 0.2) is inside
    t = np.linspace(0, 10, 50)
    assert vc.decay_rate(t, 3 * np.exp(-0.7 * t), 2, 8) == pytest.approx(-0.7)
    y = np.stack([np.exp(-0.5 * t), np.exp(-0.5 * t + 1), np.exp(-2 * t)], axis=1)
    assert vc.median_decay_rate(t, y, 2, 8) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="symmetric"):
        vc.simulate_rescaled(np.ones((3, 2)), 1.0, np.array([[1.0, 1.0], [0.0, 1.0]]), 1.0)


def test_quick_config_passes(tmp_path):
    summary = run_experiment("value-clustering", {}, seed=0, out=tmp_path, quick=True)
    assert summary["state"] == "done", summary["message"]
    failed = [c for c in summary["checks"] if not c.passed]
    assert not failed, failed
    assert (tmp_path / summary["id"] / "figures" / "value-clustering.png").exists()


@pytest.mark.parametrize("sets, message", [({"simple_spectrum": "1,1,0.5"}, "simple"),
                                           ({"degenerate_spectrum": "1,0.5,0.3"}, "multiplicity"),
                                           ({"t_max": 5.0}, "t_max")])
def test_bad_config(sets, message):
    with pytest.raises(ConfigError, match=message):
        get("value-clustering").make_config(sets)
