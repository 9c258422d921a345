"""The scaling-law entry: synthetic data, one grid point, and its check rows."""

import numpy as np
import torch

from lmech.experiments.scaling_law import HOFFMANN, check, synthetic_grid, train_point
from lmech.theory.scaling import chinchilla_loss


def test_synthetic_grid_is_the_hoffmann_law_with_multiplicative_noise():
    n, d, loss = synthetic_grid(0.02, seed=0)
    assert n.shape == d.shape == loss.shape == (36,)
    ratio = np.log(loss / chinchilla_loss(n, d, **HOFFMANN))
    assert 0.01 < ratio.std() < 0.03 and abs(ratio.mean()) < 0.01


def test_train_point_counts_parameters_and_learns():
    torch.manual_seed(0)
    x = torch.randn(400, 40)
    y = (x[:, 0] > 0).long()
    n_params, loss = train_point(8, 384, x, y, x[:100], y[:100], lr=1e-2, batch=16, seed=0)
    assert n_params == 40 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    assert np.isfinite(loss) and loss < np.log(10)


def test_check_requires_positive_lower_bounds():
    result = {"replicates": 5, "rms_tolerance": 0.1, "mnist1d.rms_rel_residual": 0.05,
              **{f"synthetic.coverage.{k}": 1.0 for k in HOFFMANN},
              "mnist1d.ci": {"alpha": [0.0, 1.0], "beta": [0.1, 0.5]}}
    rows = {r.quantity: r for r in check(result)}
    assert not rows["mnist1d: lower 95% bound of alpha (width exponent)"].passed
    assert rows["mnist1d: lower 95% bound of beta (data exponent)"].passed
    result["synthetic.coverage.E"] = 0.6
    assert not {r.quantity: r for r in check(result)}["synthetic: 95% CI covers true E (fraction of 5 data sets)"].passed


def test_probes_economy_on_every_grid_point_changes_no_measurement(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"replicates": 1, "n_boot": 20, "mnist_boot": 20, "widths": "4,8", "data_sizes": "160,320,640"}
    _, probed = assert_probes_leave_training_unchanged("scaling-law", tiny, tmp_path, "probe/loss")
    assert probed.dropna(subset=["w8/D640/probe/loss"])["step"].tolist() == [4 * k for k in range(1, 11)]
