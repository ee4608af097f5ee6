"""What acceptance predicts for speed: the step-cost model against direct computations."""

from __future__ import annotations

import math

import pytest

from adaspec import speedup


def test_at_least_is_accepted_over_drafted_per_position():
    assert speedup.at_least([8, 4, 1], [10, 10, 8]) == [0.8, 0.4, 0.125]
    assert math.isnan(speedup.at_least([0], [0])[0])


def test_expected_tokens_equals_the_iid_formula_for_geometric_acceptance():
    a = 0.7
    geometric = [a ** i for i in range(1, 9)]  # P(A >= i) = a^i when drafts are i.i.d.
    for g in range(1, 9):
        assert speedup.expected_tokens(geometric, g) == pytest.approx(
            speedup.iid_expected_tokens(a, g), rel=1e-12)
    assert speedup.iid_expected_tokens(1.0, 4) == 5.0
    with pytest.raises(ValueError):
        speedup.expected_tokens(geometric[:2], 3)


def test_predicted_speedup_is_tokens_per_step_over_step_cost():
    at_least = [0.9, 0.7, 0.5, 0.3]
    verify = {1: 1.1, 2: 1.2, 3: 1.35, 4: 1.56}
    got = speedup.predicted_speedups(at_least, 0.06, verify)
    for g, value in got.items():
        tokens = 1 + sum(at_least[:g])
        assert value == pytest.approx(tokens / (g * 0.06 + verify[g]))
    assert set(got) == {1, 2, 3, 4}
    # the numbers: full head (c = 0.16) at a = 0.5 barely breaks even; a small head wins
    iid = [0.5 ** i for i in range(1, 5)]
    full = speedup.predicted_speedups(iid, 0.16, {4: 1.56})[4]
    small = speedup.predicted_speedups(iid, 0.06, {4: 1.56})[4]
    assert full < 1.0 < small
    assert speedup.best_gamma(got) == max(got, key=got.get)


def test_best_gamma_prefers_the_smaller_on_a_tie():
    assert speedup.best_gamma({1: 1.2, 2: 1.5, 3: 1.5}) == 2
    with pytest.raises(ValueError):
        speedup.best_gamma({})
