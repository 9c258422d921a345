"""The kernel-curves entry: tasks, kernels, config limits and check rows."""

import numpy as np
import pytest

from lmech.experiments import get
from lmech.errors import ConfigError
from lmech.experiments.kernel_curves import KernelCurvesConfig, check, gram, mnist1d_task, synthetic_task
from lmech.theory import kernels as kr


def test_tasks():
    cfg = KernelCurvesConfig(synthetic_pool=50, mnist_pool=60)
    x, f = synthetic_task(cfg, seed=0)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0)
    np.testing.assert_allclose(f, np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2])
    xm, ym = mnist1d_task(cfg)
    assert xm.shape == (60, 40) and ym.shape == (60, 10)
    np.testing.assert_allclose(ym.sum(axis=0), 0.0, atol=1e-12)  # centered one-hot


def test_gram_uses_the_median_distance_by_default():
    x = np.random.default_rng(0).standard_normal((30, 3))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    med = np.median(d[np.triu_indices(30, 1)])
    np.testing.assert_allclose(gram("laplace", x), kr.laplace_kernel(x, x, med))
    np.testing.assert_allclose(gram("relu_ntk", x), kr.relu_ntk(x, x))


def test_config_limits():
    with pytest.raises(ConfigError, match="pool/8"):
        get("kernel-curves").make_config({"ns": "16,300"})
    with pytest.raises(ConfigError, match="ridge must be > 0"):
        get("kernel-curves").make_config({"ridge": 0.0})


def test_check_rows_only_from_n_min():
    result = {"ns": [8, 16, 32], "n_min": 16, "tolerance": 0.1, "kernels": {"synthetic": "laplace", "mnist1d": "relu_ntk"},
              "synthetic.theory": [1.0, 1.0, 1.0], "synthetic.measured": [2.0, 1.05, 1.2],
              "mnist1d.theory": [1.0, 1.0, 1.0], "mnist1d.measured": [1.0, 1.0, 1.0]}
    rows = check(result)
    assert len(rows) == 4
    assert [r.passed for r in rows] == [True, False, True, True]
