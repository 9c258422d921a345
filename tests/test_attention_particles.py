"""The attention-particles entry: plateau bookkeeping, config guard, and check rows."""

import numpy as np
import pytest

from lmech.experiments import get
from lmech.experiments.attention_particles import check, cluster_plateaus
from lmech.errors import ConfigError


def test_cluster_plateaus():
    t = np.array([0, 1, 2, 3, 4, 5.0])
    assert cluster_plateaus(t, np.array([5, 5, 3, 3, 3, 1])) == [(5, 0.0, 1.0), (3, 2.0, 4.0), (1, 5.0, 5.0)]


def test_usa_step_guard():
    with pytest.raises(ConfigError, match="exp\\(beta\\)"):
        get("attention-particles").make_config({"beta": 9.0, "usa_dt": 0.01})


def test_check_fails_loudly_on_missing_and_bad_values():
    result = {"SA.min_rel_energy_change": -1e-6, "USA.min_rel_energy_change": 0.0, "SA.metastable_clusters": None,
              "SA.count_increases": 0, "SA.final_clusters": 2, "causal.first_token_displacement": 0.0,
              "causal.max_gap_to_first_token": 0.0, "equi.SA.t90_predicted": 1.0, "equi.SA.t90_measured": None,
              "equi.USA.t90_predicted": 1.0, "equi.USA.t90_measured": 1.0}
    passed = [r.passed for r in check(result)]
    assert passed == [False, True, False, True, False, True, True, False, True]
