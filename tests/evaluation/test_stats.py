"""Known-answer tests for evaluation.stats."""

import math

import numpy as np
import pytest

from evaluation import stats


# ---------------------------------------------------------------- calibration

def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 200_000)
    calibrated = rng.random(conf.size) < conf
    assert stats.expected_calibration_error(conf, calibrated) < 0.02
    overconfident = rng.random(conf.size) < conf - 0.3
    assert stats.expected_calibration_error(conf, overconfident) == pytest.approx(0.3, abs=0.02)


def test_ece_hand_example():
    # bins=2: (0, .5] holds 0.2 (wrong) and 0.4 (right): |0.5 - 0.3| = 0.2, weight 2/4.
    #         (.5, 1] holds 0.6 (right) and 1.0 (right): |1.0 - 0.8| = 0.2, weight 2/4.
    conf = [0.2, 0.4, 0.6, 1.0]
    correct = [False, True, True, True]
    assert stats.expected_calibration_error(conf, correct, bins=2) == pytest.approx(0.2, abs=1e-12)
    # One bin: |0.75 - 0.55| = 0.2 too; four bins: each point alone (0.2, 0.6, 0.4, 0.0) -> 0.3.
    assert stats.expected_calibration_error(conf, correct, bins=1) == pytest.approx(0.2, abs=1e-12)
    assert stats.expected_calibration_error(conf, correct, bins=4) == pytest.approx(0.3, abs=1e-12)


def test_reliability_bins_edges_and_empty_bins():
    # 0 joins the first bin; 0.6 lies in (0.4, 0.6], not (0.6, 0.8]; 0.5 is exactly an edge.
    rb = stats.reliability_bins([0.0, 0.6, 0.6, 0.2], [1, 0, 1, 0], bins=5)
    np.testing.assert_array_equal(rb.count, [2, 0, 2, 0, 0])
    np.testing.assert_allclose(rb.lower, [0, .2, .4, .6, .8])
    np.testing.assert_allclose(rb.upper, [.2, .4, .6, .8, 1])
    np.testing.assert_allclose(rb.mean_confidence[[0, 2]], [0.1, 0.6])
    np.testing.assert_allclose(rb.accuracy[[0, 2]], [0.5, 0.5])
    assert np.isnan(rb.mean_confidence[[1, 3, 4]]).all() and np.isnan(rb.accuracy[[1, 3, 4]]).all()


def test_ece_equals_reliability_bins_recomputation():
    rng = np.random.default_rng(1)
    conf = rng.random(5000)
    correct = rng.random(5000) < conf ** 2
    for bins in (1, 7, 15):
        rb = stats.reliability_bins(conf, correct, bins=bins)
        assert rb.count.sum() == conf.size
        filled = rb.count > 0
        recomputed = np.sum(np.abs(rb.accuracy - rb.mean_confidence)[filled] * rb.count[filled]) / conf.size
        assert stats.expected_calibration_error(conf, correct, bins=bins) == pytest.approx(recomputed, abs=1e-15)


@pytest.mark.parametrize("conf, correct, bins, match", [
    ([0.5, 1.2], [1, 0], 15, r"confidence must lie in \[0, 1\], got 1.2 at index 1"),
    ([-0.1], [1], 15, r"confidence must lie in \[0, 1\], got -0.1"),
    ([0.5, math.nan], [1, 0], 15, "must not contain NaN"),
    ([], [], 15, "non-empty"),
    ([0.5, 0.5], [1], 15, r"correct must have shape \(2,\), got \(1,\)"),
    ([0.5], [2], 15, "correct must be bool or 0/1, got 2"),
    ([0.5], [1], 0, "bins must be an integer >= 1, got 0"),
])
def test_calibration_bad_inputs(conf, correct, bins, match):
    with pytest.raises(ValueError, match=match):
        stats.expected_calibration_error(conf, correct, bins=bins)
    with pytest.raises(ValueError, match=match):
        stats.reliability_bins(conf, correct, bins=bins)


# ---------------------------------------------------------------- AUROC

def test_auroc_known_answers():
    assert stats.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert stats.auroc([0, 1, 2], [3, 4, 5]) == 0.0
    assert stats.auroc([1, 1, 1], [1, 1]) == 0.5
    # Pairs (pos, neg): (1,1) tie, (1,0) win, (2,1) win, (2,0) win, (0,1) loss, (0,0) tie -> (3 + 0.5*2)/6.
    assert stats.auroc([1, 2, 0], [1, 0]) == pytest.approx(4 / 6, abs=1e-15)
    assert stats.auroc([0.5, 0.9], [0.5]) == pytest.approx(0.75, abs=1e-15)  # One tie, one win.


def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        pos = rng.integers(0, 8, rng.integers(1, 60)).astype(float)
        neg = rng.integers(0, 6, rng.integers(1, 60)).astype(float)
        diff = pos[:, None] - neg[None, :]
        brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert stats.auroc(pos, neg) == pytest.approx(brute, abs=1e-12)


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="scores_negative must be a non-empty 1-D array"):
        stats.auroc([1.0], [])
    with pytest.raises(ValueError, match="scores_positive must not contain NaN"):
        stats.auroc([math.nan], [1.0])


# ---------------------------------------------------------------- risk-coverage

def test_risk_coverage_with_tie_group():
    # Descending: 0.9 (right) | 0.8, 0.8 (one wrong) | 0.5 (wrong) | 0.1 (right).
    conf = [0.8, 0.5, 0.9, 0.8, 0.1]
    correct = [True, False, True, False, True]
    rc = stats.risk_coverage(conf, correct)
    np.testing.assert_allclose(rc.coverage, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(rc.risk, [0.0, 1 / 3, 0.5, 0.4])
    np.testing.assert_allclose(rc.threshold, [0.9, 0.8, 0.5, 0.1])
    # Step area: 0*0.2 + (1/3)*0.4 + 0.5*0.2 + 0.4*0.2 = mean over the 5 levels of [0, 1/3, 1/3, .5, .4].
    assert rc.aurc == pytest.approx((0 + 1 / 3 + 1 / 3 + 0.5 + 0.4) / 5, abs=1e-12)
    assert stats.risk_at_coverage(rc, 0.2) == 0.0
    assert stats.risk_at_coverage(rc, 0.4) == pytest.approx(1 / 3)  # 0.4 is inside the tie group -> 0.6.
    assert stats.risk_at_coverage(rc, 1.0) == pytest.approx(0.4)
    assert stats.coverage_at_risk(rc, 0.45) == pytest.approx(1.0)
    assert stats.coverage_at_risk(rc, 0.39) == pytest.approx(0.6)
    assert stats.coverage_at_risk(rc, 0.0) == pytest.approx(0.2)
    assert stats.coverage_at_risk(stats.risk_coverage([0.5], [False]), 0.5) == 0.0


def test_risk_coverage_without_ties_aurc_is_mean_risk():
    rng = np.random.default_rng(3)
    conf = rng.permutation(50) / 50.0
    correct = rng.random(50) < conf
    rc = stats.risk_coverage(conf, correct)
    np.testing.assert_allclose(rc.coverage, np.arange(1, 51) / 50)
    assert rc.aurc == pytest.approx(rc.risk.mean(), abs=1e-12)


def test_risk_coverage_bad_inputs():
    with pytest.raises(ValueError, match="confidence must be finite, got inf"):
        stats.risk_coverage([0.5, math.inf], [1, 0])
    rc = stats.risk_coverage([0.5, 0.7], [1, 0])
    with pytest.raises(ValueError, match=r"coverage must lie in \(0, 1\], got 0"):
        stats.risk_at_coverage(rc, 0)
    with pytest.raises(ValueError, match=r"max_risk must lie in \[0, 1\], got 1.5"):
        stats.coverage_at_risk(rc, 1.5)


# ---------------------------------------------------------------- power law

def test_power_law_exact_recovery():
    sizes = stats.geometric_sizes(10, 100_000, per_decade=3)
    errors = 0.5 * np.asarray(sizes, float) ** -0.1
    fit = stats.fit_power_law(sizes, errors, bootstrap=200)
    assert abs(fit.slope + 0.1) < 1e-9
    assert abs(fit.intercept - math.log10(0.5)) < 1e-9
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert (fit.points, fit.dropped) == (len(sizes), 0)
    assert abs(fit.slope_low + 0.1) < 1e-9 and abs(fit.slope_high + 0.1) < 1e-9


def test_power_law_query_bootstrap_covers_true_slope():
    rng = np.random.default_rng(4)
    sizes = np.asarray(stats.geometric_sizes(10, 10_000, per_decade=3))
    p_err = 0.5 * sizes.astype(float) ** -0.1
    correct = rng.random((sizes.size, 2000)) >= p_err[:, None]
    errors = 1.0 - correct.mean(axis=1)
    fit = stats.fit_power_law(sizes, errors, per_query_correct=correct, bootstrap=500, seed=7)
    assert fit.slope_low < -0.1 < fit.slope_high
    assert 0 < fit.slope_high - fit.slope_low < 0.1
    assert fit.slope_low <= fit.slope <= fit.slope_high
    # Same seed, same interval; the pairs bootstrap (no per-query data) also brackets the estimate.
    again = stats.fit_power_law(sizes, errors, per_query_correct=correct, bootstrap=500, seed=7)
    assert (again.slope_low, again.slope_high) == (fit.slope_low, fit.slope_high)
    pairs = stats.fit_power_law(sizes, errors, bootstrap=500, seed=7)
    assert pairs.slope == fit.slope and pairs.slope_low < pairs.slope < pairs.slope_high


def test_power_law_drops_zero_errors():
    sizes = [10, 100, 1000, 10_000, 100_000]
    errors = [0.4, 0.2, 0.1, 0.0, 0.0]
    fit = stats.fit_power_law(sizes, errors, bootstrap=0)
    assert (fit.points, fit.dropped) == (3, 2)
    assert fit.slope == pytest.approx(-math.log10(2), abs=1e-12)
    assert math.isnan(fit.slope_low) and math.isnan(fit.slope_high)
    with pytest.raises(ValueError, match="at least 3 points with error > 0 to fit a power law, got 2"):
        stats.fit_power_law(sizes, [0.4, 0.2, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[10, 0, 30], errors=[.3, .2, .1]), r"sizes must be positive integers \(>= 1\), got 0.0 at index 1"),
    (dict(sizes=[10, 20.5, 30], errors=[.3, .2, .1]), "got 20.5 at index 1"),
    (dict(sizes=[10, 20, 30], errors=[.3, 1.5, .1]), r"errors must lie in \[0, 1\], got 1.5 at index 1"),
    (dict(sizes=[10, 20, 30], errors=[.3, .2]), r"errors must have shape \(3,\)"),
    (dict(sizes=[10, 10, 10], errors=[.3, .2, .1]), "usable sizes must not all be equal, got only size 10"),
    (dict(sizes=[10, 20, 30], errors=[.3, .2, .1], confidence=1.0), r"confidence must lie in \(0, 1\), got 1.0"),
    (dict(sizes=[10, 20, 30], errors=[.3, .2, .1], bootstrap=-1), "bootstrap must be an integer >= 0, got -1"),
    (dict(sizes=[10, 20, 30], errors=[.5, .5, .5], per_query_correct=np.ones((2, 2), bool)),
     r"per_query_correct must have shape \[3, num_queries >= 1\], got \(2, 2\)"),
    (dict(sizes=[10, 20, 30], errors=[.5, .5, .25], per_query_correct=[[1, 0], [0, 1], [1, 0]]),
     r"errors\[2\] = 0.25 but 1 - mean\(per_query_correct\[2\]\) = 0.5"),
])
def test_power_law_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stats.fit_power_law(**kwargs)


# ---------------------------------------------------------------- geometric sizes

def test_geometric_sizes():
    assert stats.geometric_sizes(10, 1000, per_decade=3) == [10, 22, 46, 100, 215, 464, 1000]
    assert stats.geometric_sizes(1, 10) == [1, 2, 5, 10]
    assert stats.geometric_sizes(30, 150, per_decade=1) == [30, 100, 150]
    assert stats.geometric_sizes(7, 7) == [7]
    grid = stats.geometric_sizes(3, 123_456, per_decade=5)
    assert grid[0] == 3 and grid[-1] == 123_456 and all(a < b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="high must be an integer >= 100, got 10"):
        stats.geometric_sizes(100, 10)
    with pytest.raises(ValueError, match="per_decade must be an integer >= 1, got 0"):
        stats.geometric_sizes(1, 10, per_decade=0)
