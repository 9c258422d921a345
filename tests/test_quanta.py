"""The quanta entry: the online sampler matches the task, and the analysis recovers known laws."""

import numpy as np
import torch

from lmech.experiments.quanta import LN2, OnlineSampler, analyze, check
from lmech.tasks import sparse_parity


def test_online_sampler_labels_and_frequencies_match_the_task():
    data = sparse_parity(n_tasks=6, n_bits=10, k=3, n_train=50, n_test=60, zipf_exponent=1.5, seed=3)
    sampler = OnlineSampler(data, seed=0)
    bits = data.x_train[:, 6:].long()
    assert torch.equal(sampler.labels(data.groups_train, bits), data.y_train)
    x, y = sampler(20000)
    assert x.shape == (20000, 16)
    tasks = x[:, :6].argmax(1)
    np.testing.assert_allclose(torch.bincount(tasks, minlength=6).numpy() / 20000, data.info["frequencies"], atol=0.01)
    assert torch.equal(sampler.labels(tasks, x[:, 6:].long()), y)


def test_analyze_recovers_a_synthetic_quanta_world():
    """Tasks drop as sigmoids in log-steps at t_i = c / p_i: gamma = 1, frequency order, sharp steps."""
    n_tasks, alpha = 40, 1.0
    probs = np.arange(1, n_tasks + 1) ** -(alpha + 1.0)
    probs /= probs.sum()
    steps = np.geomspace(10, 1e4, 200)  # ends with about half the tasks unlearned
    t_i = 20.0 / probs
    losses = LN2 / (1.0 + np.exp(4.0 * (np.log(steps)[:, None] - np.log(t_i)[None, :])))
    res = analyze(steps, losses, probs, alpha)
    assert abs(res["gamma"] - 1.0) < 0.02 and res["spearman"] == 1.0
    assert res["median_width"] < 1.2  # ln(81) / 4 = 1.1 for this sigmoid
    assert abs(res["exponent_measured"] - res["exponent_superposition"]) / res["exponent_superposition"] < 0.1
    assert abs(res["exponent_quanta_model"] - res["exponent_superposition"]) < 1e-9  # t_i = c / p_i exactly
    assert all(r.passed for r in check(res))


def test_too_few_learned_tasks_is_one_failing_row():
    probs = np.full(8, 1 / 8)
    losses = np.full((10, 8), LN2)
    res = analyze(np.geomspace(10, 1000, 10), losses, probs, 0.5)
    rows = check(res)
    assert len(rows) == 1 and not rows[0].passed
