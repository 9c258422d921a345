"""The economy preset sized by the training batch (``preset("economy", train_batch=B)``): gradient
noise on min(32, B) examples (at least 3), sharpness on min(64, B // 4) (at least 1); without
``train_batch`` the fixed 32 and 64 examples, unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmech import Monitor
from lmech.monitor import preset
from lmech.probes import GradNoiseProbe, SharpnessProbe


def sizes(probes):
    noise = next(p for p in probes if isinstance(p, GradNoiseProbe)).num_examples
    curvature = next(p for p in probes if isinstance(p, SharpnessProbe)).num_examples
    return noise, curvature


@pytest.mark.parametrize("train_batch, expected", [(None, (32, 64)), (8, (8, 2)), (128, (32, 32)),
                                                   (1024, (32, 64)), (2, (3, 1)), (1, (3, 1))])
def test_sample_sizes(train_batch, expected):
    assert sizes(preset("economy", train_batch=train_batch)) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_bad_train_batch_is_refused(bad):
    with pytest.raises(ValueError, match="train_batch must be a positive number of examples"):
        preset("economy", train_batch=bad)


def test_sized_preset_measures_its_subsets():
    """Sharpness of the sized preset is the fixed preset's probe on the first B // 4 examples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss = nn.functional.cross_entropy
    sized = Monitor(net, loss, (x, y), probes=preset("economy", train_batch=16)).measure(0)
    first = Monitor(net, loss, (x[:4], y[:4]), probes=[SharpnessProbe(k=1, tol=5e-2, max_iter=4)]).measure(0)
    noise = Monitor(net, loss, (x[:16], y[:16]), probes=[GradNoiseProbe(per_layer=True)]).measure(0)
    assert sized["sharpness/lambda_1"] == pytest.approx(first["sharpness/lambda_1"], rel=1e-12)
    assert sized["gradnoise/snr"] == pytest.approx(noise["gradnoise/snr"], rel=1e-12)
    assert sized["probe/loss"] == pytest.approx(float(loss(net(x), y).detach()), rel=1e-12)  # the whole probe batch
