"""The saddle-to-saddle entry: step counting, the template task, and the linear GD run."""

import numpy as np
import pytest
import torch

from lmech.experiments import get
from lmech.errors import ConfigError
from lmech.experiments.saddle_to_saddle import count_steps, learned_fractions, linear_run, modular_problem
from lmech.theory import deep_linear as dl


def test_count_steps_merges_overlapping_windows():
    assert count_steps([(0, 1, 2), (3, 4, 5), (6, 7, 8)]) == 3
    assert count_steps([(0, 1, 4), (3, 4, 5), (6, 7, 8)]) == 2
    assert count_steps([(0, 1, 9), (3, 4, 5), (6, 7, 8)]) == 1
    assert count_steps([(0, 1, 2), (None, None, None)]) is None


def test_template_task_has_the_requested_spectrum():
    p, mags = 7, [1.0, 0.5, 0.25]
    x, y, template = modular_problem(p, mags, seed=0)
    spectrum = np.abs(np.fft.fft(template))
    np.testing.assert_allclose(spectrum[1:4], np.sqrt(p) * np.array(mags), atol=1e-12)
    assert spectrum[0] == pytest.approx(0.0, abs=1e-12)
    a, b = 3, 5
    np.testing.assert_allclose(x[a * p + b].numpy(), np.concatenate([np.roll(template, a), np.roll(template, b)]))
    np.testing.assert_allclose(y[a * p + b].numpy(), np.roll(template, (a + b) % p))


def test_learned_fractions():
    _, y, _ = modular_problem(7, [1.0, 0.5], seed=1)
    y_hat = torch.fft.fft(y, dim=1)
    np.testing.assert_allclose(learned_fractions(y, y_hat, 2), 1.0)
    np.testing.assert_allclose(learned_fractions(torch.zeros_like(y), y_hat, 2), 0.0)


def test_linear_run_follows_the_gradient_flow():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((4, 4)))[0][:, :2]
    v = np.linalg.qr(rng.standard_normal((4, 4)))[0][:, :2]
    teacher = u @ np.diag([2.0, 1.0]) @ v.T
    g1, g2 = rng.standard_normal((6, 4)), rng.standard_normal((4, 6))
    t, losses, modes, maps = linear_run(0.1, g1, g2, teacher, u, v, eta=1e-3, t_max=2.0)
    flow = dl.gradient_flow([0.1 * g1, 0.1 * g2], np.eye(4), teacher, np.array([0.0, 2.0]))
    np.testing.assert_allclose(maps[-1], flow.end_to_end(1), atol=5e-3)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, 0.5 * ((maps - teacher) ** 2).sum(axis=(1, 2)))


def test_bad_configs():
    with pytest.raises(ConfigError, match="between 1 and"):
        get("saddle-to-saddle").make_config({"p": 7, "magnitudes": "1,0.9,0.8,0.7"})
    with pytest.raises(ConfigError, match="init_scales"):
        get("saddle-to-saddle").make_config({"init_scales": "1e-3"})


def test_probes_economy_on_the_modular_part_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"d": 4, "singular_values": "2,1", "width": 4, "eta": 0.05, "init_scales": "1e-2,1e-3", "p": 5,
            "magnitudes": "1,0.5", "mod_width": 8, "mod_steps": 40, "mod_eval_every": 10}
    _, probed = assert_probes_leave_training_unchanged("saddle-to-saddle", tiny, tmp_path)
    assert probed.dropna(subset=["probe/loss"])["step"].tolist() == [10, 20, 30, 40]
