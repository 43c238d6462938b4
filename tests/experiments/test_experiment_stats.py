import math

import numpy as np
import pytest
from scipy import stats

from polyak.experiments.report import verdict
from polyak.experiments.stats import (
    curve_stability,
    early_stop_epoch,
    paired_comparison,
    summarise,
    win_tie_loss,
)

RAW = [0.52, 0.61, 0.47, 0.55, 0.58, 0.49, 0.63, 0.51, 0.56, 0.60]
AVG = [0.50, 0.55, 0.48, 0.50, 0.52, 0.47, 0.58, 0.50, 0.51, 0.57]


def test_summarise_matches_numpy():
    s = summarise(RAW)
    assert s.mean == pytest.approx(np.mean(RAW), rel=1e-12)
    assert s.std == pytest.approx(np.std(RAW, ddof=1), rel=1e-12)
    assert (s.min, s.max, s.n) == (min(RAW), max(RAW), 10)
    assert summarise([3.0]).std == 0.0
    with pytest.raises(ValueError, match="empty"):
        summarise([])


def test_paired_comparison_matches_scipy():
    c = paired_comparison(AVG, RAW, higher_is_better=False)
    d = np.subtract(AVG, RAW)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert c.mean_diff == pytest.approx(d.mean(), rel=1e-12)
    assert (c.ci95_low, c.ci95_high) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
    assert c.t_pvalue == pytest.approx(stats.ttest_rel(AVG, RAW).pvalue, rel=1e-10)
    assert c.wilcoxon_pvalue == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-10)
    assert c.relative_change == pytest.approx(d.mean() / np.mean(RAW), rel=1e-12)
    assert c.improves
    assert c.significant
    assert not c.worsens


def test_paired_ci_closed_form():
    # d = 1..5: mean 3, sd sqrt(2.5), t_{0.975,4} = 2.7764451051977987
    c = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5, higher_is_better=True)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert c.ci95_low == pytest.approx(3 - half, rel=1e-9)
    assert c.ci95_high == pytest.approx(3 + half, rel=1e-9)
    assert math.isnan(c.relative_change)  # raw mean is 0
    assert (c.wins, c.ties, c.losses) == (5, 0, 0)


def test_paired_comparison_degenerate_cases():
    same = paired_comparison([1.0, 2.0], [1.0, 2.0], higher_is_better=True)
    assert math.isnan(same.t_pvalue)
    assert math.isnan(same.wilcoxon_pvalue)
    assert not same.significant
    assert (same.wins, same.ties, same.losses) == (0, 2, 0)
    one = paired_comparison([1.0], [2.0], higher_is_better=True)
    assert math.isnan(one.ci95_low)
    assert not one.significant
    assert verdict(one, 1.0) == "not enough seeds"
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0], [1.0, 2.0], higher_is_better=True)


def test_win_tie_loss_directions_and_tolerance():
    avg, raw = [1.0, 2.0, 3.0, 4.0], [1.05, 1.0, 3.5, 4.0]
    assert win_tie_loss(avg, raw, higher_is_better=True) == (1, 1, 2)
    assert win_tie_loss(avg, raw, higher_is_better=False) == (2, 1, 1)
    assert win_tie_loss(avg, raw, higher_is_better=False, tie_tolerance=0.1) == (1, 2, 1)
    with pytest.raises(ValueError, match="tie_tolerance"):
        win_tie_loss(avg, raw, higher_is_better=True, tie_tolerance=-1)


def test_verdicts():
    better = paired_comparison(AVG, RAW, higher_is_better=False)
    assert verdict(better, better.mean_diff) == "reproduces"
    assert verdict(better, -0.5) == "direction only (size differs)"
    worse = paired_comparison(RAW, AVG, higher_is_better=False)
    assert verdict(worse, -0.1).startswith("does not reproduce (averaging is worse)")
    # one huge raw outlier: the t-interval includes 0, the signed-rank test does not
    skewed = paired_comparison([1.0] * 9 + [1.0], [1.1] * 9 + [30.0], higher_is_better=False)
    assert not skewed.significant
    assert skewed.wilcoxon_pvalue < 0.05
    assert verdict(skewed, -0.5).startswith("inconclusive")
    noisy = paired_comparison([1.0, 2.0, 1.0, 2.0], [1.5, 1.5, 1.5, 1.5], higher_is_better=True)
    assert verdict(noisy, 1.0) == "does not reproduce (no significant difference)"


def test_curve_stability():
    curve = [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 1.0, 3.0]
    s = curve_stability(curve, late_fraction=0.25)
    assert s.epochs == 2
    assert s.range == 2.0
    assert s.std == pytest.approx(np.std([1.0, 3.0], ddof=1))
    s = curve_stability(curve, late_fraction=0.5)
    assert s.epochs == 4
    assert s.range == 8.0
    assert s.std == pytest.approx(np.std(curve[-4:], ddof=1))
    with pytest.raises(ValueError, match="at least 2"):
        curve_stability([1.0])
    with pytest.raises(ValueError, match="late_fraction"):
        curve_stability(curve, late_fraction=0)


def test_early_stop_epoch():
    curve = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 2.0]
    assert early_stop_epoch(curve, 3, higher_is_better=False) == (2, 5)
    assert early_stop_epoch(curve, 4, higher_is_better=False) == (6, 6)
    assert early_stop_epoch([1.0, 2.0, 2.0, 1.0], 2, higher_is_better=True) == (1, 3)
    with pytest.raises(ValueError, match="patience"):
        early_stop_epoch(curve, 0, higher_is_better=False)
