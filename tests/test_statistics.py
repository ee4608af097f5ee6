"""Seed-level statistics against direct computations: closed-form t CDFs, tabled quantiles,
and the interval mean ± t * sd / sqrt(n) computed here in float64 numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaspec.statistics import regularized_beta, t_cdf, t_interval, t_quantile


@pytest.mark.parametrize("t", [-7.0, -1.3, 0.0, 0.4, 2.5, 30.0])
def test_t_cdf_equals_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_regularized_beta_equals_a_direct_integral():
    a, b, x = 2.5, 0.5, 0.7
    grid = np.linspace(0.0, x, 2_000_001)
    density = grid ** (a - 1) * (1 - grid) ** (b - 1)
    integral = np.trapezoid(density, grid)
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    assert regularized_beta(a, b, x) == pytest.approx(integral / beta, rel=1e-6)


# Two-sided 95% critical values from standard t tables.
@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                          (9, 2.262), (30, 2.042), (120, 1.980)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)
    assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)


def test_t_interval_equals_a_direct_computation():
    values = [0.031, -0.004, 0.018]
    x = np.array(values, dtype=np.float64)
    sd = x.std(ddof=1)
    half = 4.302652729749464 * sd / math.sqrt(3)  # t_{2, 0.975}
    got = t_interval(values)
    assert got["mean"] == pytest.approx(x.mean(), abs=1e-15)
    assert got["sd"] == pytest.approx(sd, rel=1e-12)
    assert (got["low"], got["high"]) == pytest.approx((x.mean() - half, x.mean() + half),
                                                      rel=1e-9)
    assert t_interval(values, confidence=0.9)["high"] < got["high"]


def test_t_interval_of_one_seed_has_no_spread_and_none_is_an_error():
    one = t_interval([0.2])
    assert one["mean"] == 0.2 and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError):
        t_interval([])
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
