"""`studies.trend`: the weighted power-law fit of a shrinking gap, checked against numpy's weighted polyfit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_attn_zoo.studies.trend import fit_gap_trend

TOKENS = [16384, 65536, 131072, 262144]


def _reference(points, scaled: bool):
    """numpy's weighted least squares of log gap on log tokens: (slope, intercept) and their covariance (rows and
    columns: slope, intercept), `scaled` by the reduced chi-square where it exceeds 1."""
    x = np.log([t for t, _, _ in points])
    y = np.log([g for _, g, _ in points])
    sigma = np.array([s / g for _, g, s in points])
    (slope, intercept), cov = np.polyfit(x, y, 1, w=1 / sigma, cov="unscaled")
    reduced_chi2 = float(np.sum(((y - slope * x - intercept) / sigma) ** 2)) / max(len(points) - 2, 1)
    return slope, intercept, cov * (max(1.0, reduced_chi2) if scaled else 1.0)


def test_an_exact_power_law_is_recovered_with_its_budget_at_the_target():
    points = [(t, 0.5 * t**-0.25, 0.01) for t in TOKENS]
    trend = fit_gap_trend(points, target=0.02)
    assert trend.exponent == pytest.approx(-0.25) and trend.log_scale == pytest.approx(math.log(0.5))
    assert trend.tokens_at_target == pytest.approx((0.02 / 0.5) ** (1 / -0.25), rel=1e-9)
    assert trend.gap_at(TOKENS[0]) == pytest.approx(points[0][1]) and trend.points == 4
    # on the line, the errors are the points' own (no chi-square scaling): numpy's unscaled covariance
    slope, _, cov = _reference(points, scaled=False)
    assert trend.exponent_se == pytest.approx(math.sqrt(cov[0, 0]))


def test_scatter_beyond_the_errors_widens_the_exponent_error():
    points = [(16384, 0.11, 0.002), (65536, 0.08, 0.002), (131072, 0.095, 0.002), (262144, 0.07, 0.002)]
    trend = fit_gap_trend(points)
    slope, intercept, cov = _reference(points, scaled=True)  # reduced chi-square >> 1 here
    assert trend.exponent == pytest.approx(slope) and trend.log_scale == pytest.approx(intercept)
    assert trend.exponent_se == pytest.approx(math.sqrt(cov[0, 0]))
    assert trend.exponent_se > math.sqrt(_reference(points, scaled=False)[2][0, 0])


def test_the_budget_error_is_the_delta_method_of_the_fit():
    points = [(16384, 0.109, 0.007), (65536, 0.102, 0.007), (131072, 0.088, 0.007)]
    trend = fit_gap_trend(points, target=0.02)
    slope, intercept, cov = _reference(points, scaled=True)
    log_t = (math.log(0.02) - intercept) / slope
    grad = np.array([-log_t / slope, -1 / slope])  # d log t / d (slope, intercept)
    assert math.log(trend.tokens_at_target) == pytest.approx(log_t)
    assert trend.log10_tokens_se == pytest.approx(math.sqrt(grad @ cov @ grad) / math.log(10))


def test_a_gap_that_does_not_shrink_never_reaches_the_target():
    trend = fit_gap_trend([(16384, 0.03, 0.005), (65536, 0.07, 0.006)])
    assert trend.exponent > 0 and trend.tokens_at_target is None and trend.log10_tokens_se is None


def test_too_few_positive_gaps_give_no_trend():
    assert fit_gap_trend([(16384, 0.1, 0.01)]) is None
    # untuned (0 tokens) and non-positive gaps cannot lie on a power law: left out
    assert fit_gap_trend([(0, 0.3, 0.02), (16384, 0.1, 0.01), (65536, -0.01, 0.01)]) is None
    assert fit_gap_trend([(0, 0.3, 0.02), (16384, 0.1, 0.01), (65536, 0.08, 0.01)]).points == 2
    with pytest.raises(ValueError, match="target"):
        fit_gap_trend([(16384, 0.1, 0.01), (65536, 0.08, 0.01)], target=0)
