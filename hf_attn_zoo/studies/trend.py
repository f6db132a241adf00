"""Where a shrinking gap would reach a target: a power law `gap = c * tokens^b` fitted to measured gaps.

A study measures the gap (e.g. MoH's held-out perplexity against dense) at a few token budgets, each with a
standard error; the question it cannot run is at what budget the gap would fall to a target. The fit is weighted
least squares of `log gap` on `log tokens`, each point weighted by its inverse variance (`(se / gap)^2`, the delta
method); where the points scatter more than their errors allow (reduced chi-square above 1) the covariance is scaled
by it (the Birge ratio), so that a poor fit widens the error instead of hiding. The budget at the target,
`log t* = (log target - log c) / b`, gets its standard error from the fit's covariance by the delta method.

It is an extrapolation, usually across orders of magnitude: read it as an order of magnitude, not a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GapTrend", "fit_gap_trend"]

_MIN_RELATIVE_SE = 1e-3  # a point reported without error would otherwise get an infinite weight


@dataclass(frozen=True)
class GapTrend:
    """A power law `gap = exp(log_scale) * tokens^exponent` through the measured gaps, and where it meets `target`."""

    exponent: float
    exponent_se: float
    log_scale: float
    points: int
    target: float
    # budget at which the fitted gap equals `target`; None where the gap does not shrink (exponent >= 0)
    tokens_at_target: float | None
    log10_tokens_se: float | None  # standard error of log10(tokens_at_target)

    def gap_at(self, tokens: float) -> float:
        return math.exp(self.log_scale) * tokens**self.exponent


def fit_gap_trend(points: Sequence[tuple[float, float, float]], target: float = 0.02) -> GapTrend | None:
    """Fit `points` (`(tokens, gap, stderr)`; gaps as fractions, 0.05 = 5%) with a power law; `None` when fewer than
    two budgets have a positive gap (the only ones a power law can pass through)."""
    if target <= 0:
        raise ValueError(f"target={target} must be a positive gap")
    used = [(t, g, s) for t, g, s in points if t > 0 and g > 0]
    if len({t for t, _, _ in used}) < 2:
        return None
    xs = [math.log(t) for t, _, _ in used]
    ys = [math.log(g) for _, g, _ in used]
    ws = [1.0 / max(s / g, _MIN_RELATIVE_SE) ** 2 for _, g, s in used]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs))
    sy = sum(w * y for w, y in zip(ws, ys))
    sxx = sum(w * x * x for w, x in zip(ws, xs))
    sxy = sum(w * x * y for w, x, y in zip(ws, xs, ys))
    det = sw * sxx - sx * sx
    slope = (sw * sxy - sx * sy) / det
    intercept = (sy - slope * sx) / sw
    # covariance of (intercept, slope): the inverse of [[sw, sx], [sx, sxx]], scaled by the reduced chi-square if > 1
    dof = len(used) - 2
    chi2 = sum(w * (y - intercept - slope * x) ** 2 for w, x, y in zip(ws, xs, ys))
    scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
    var_a, var_b, cov_ab = scale * sxx / det, scale * sw / det, -scale * sx / det
    if slope >= 0:
        return GapTrend(slope, math.sqrt(var_b), intercept, len(used), target, None, None)
    log_t = (math.log(target) - intercept) / slope
    # d log_t / d a = -1 / b,  d log_t / d b = -log_t / b
    da, db = -1.0 / slope, -log_t / slope
    var_log_t = da * da * var_a + db * db * var_b + 2 * da * db * cov_ab
    return GapTrend(
        slope,
        math.sqrt(var_b),
        intercept,
        len(used),
        target,
        math.exp(log_t),
        math.sqrt(max(var_log_t, 0.0)) / math.log(10),
    )
