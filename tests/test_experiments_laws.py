"""lmech.experiments.laws: the small helpers the law-catalog entries share."""

import numpy as np
import pytest

from lmech.experiments.laws import first_crossing, loglog_slope, order_row, parse_list
from lmech.errors import ConfigError


def test_parse_list():
    assert parse_list("4, 2,1", float) == [4.0, 2.0, 1.0]
    assert parse_list("2,3", int) == [2, 3]
    with pytest.raises(ConfigError, match="comma-separated ints"):
        parse_list("2,x", int, "depths")
    with pytest.raises(ConfigError, match="at least one value"):
        parse_list(" , ", float)


def test_first_crossing_interpolates_and_reports_never():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([0.0, 0.2, 0.6, 1.0])
    assert first_crossing(t, y, 0.4) == pytest.approx(1.5)
    assert first_crossing(t, y, 2.0) is None
    assert first_crossing(t, 1 - y, 0.6, rising=False) == pytest.approx(1.5)
    assert first_crossing(t, y, -1.0) == 0.0


def test_loglog_slope_of_a_power_law():
    x = np.geomspace(1, 100, 20)
    slope, r2 = loglog_slope(x, 3 * x ** -0.7)
    assert slope == pytest.approx(-0.7) and r2 == pytest.approx(1.0)


def test_order_row():
    assert order_row("q", [1, 2, 3], [1, 2, 3]).passed
    row = order_row("q", [1, 2, 3], [2, 1, 3])
    assert not row.passed and row.measured == "2,1,3"
