"""Statistics over seeds: summaries, paired differences, paired tests, win/tie/loss, curve stability.

Everything is paired by seed: seed ``s`` gives the raw and the averaged model the same data, the same
initialisation and the same minibatch order, so ``d_s = averaged_s - raw_s`` isolates averaging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "PairedComparison",
    "Stability",
    "Summary",
    "curve_stability",
    "early_stop_epoch",
    "paired_comparison",
    "summarise",
    "win_tie_loss",
]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; 0 for one value), min, max and count."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(values: Sequence[float]) -> Summary:
    """mean, std (n-1 denominator), min, max of ``values``."""
    if len(values) == 0:
        raise ValueError("summarise: values is empty")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, min(values), max(values), n)


def win_tie_loss(
    averaged: Sequence[float], raw: Sequence[float], *, higher_is_better: bool, tie_tolerance: float = 0.0
) -> tuple[int, int, int]:
    """Count seeds where the averaged model is better / within ``tie_tolerance`` / worse than raw.

    A tie is ``|averaged - raw| <= tie_tolerance`` (absolute, in the metric's unit).
    """
    _check_paired(averaged, raw)
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    wins = ties = losses = 0
    for a, r in zip(averaged, raw):
        if abs(a - r) <= tie_tolerance:
            ties += 1
        elif (a > r) == higher_is_better:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


@dataclass(frozen=True)
class PairedComparison:
    """``averaged - raw`` over seeds: mean difference, its 95% t-interval, relative change, paired
    t-test and Wilcoxon signed-rank p-values (two-sided), and win/tie/loss."""

    n: int
    raw: Summary
    averaged: Summary
    mean_diff: float
    ci95_low: float
    ci95_high: float
    relative_change: float  # mean_diff / mean(raw)
    t_pvalue: float  # NaN when it cannot be computed (n < 2, or every difference equal)
    wilcoxon_pvalue: float  # NaN when every difference is 0 or n < 2
    wins: int
    ties: int
    losses: int
    tie_tolerance: float
    higher_is_better: bool

    @property
    def significant(self) -> bool:
        """The 95% interval of the mean difference excludes 0."""
        return self.n > 1 and (self.ci95_low > 0 or self.ci95_high < 0)

    @property
    def improves(self) -> bool:
        """Significantly better (95% interval on the good side of 0)."""
        if not self.significant:
            return False
        return self.ci95_low > 0 if self.higher_is_better else self.ci95_high < 0

    @property
    def worsens(self) -> bool:
        return self.significant and not self.improves

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["significant"], out["improves"], out["worsens"] = self.significant, self.improves, self.worsens
        return out


def _check_paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError("paired samples are empty")


def paired_comparison(
    averaged: Sequence[float], raw: Sequence[float], *, higher_is_better: bool, tie_tolerance: float = 0.0
) -> PairedComparison:
    """Paired statistics of ``d = averaged - raw``.

    CI: ``mean(d) ± t_{0.975, n-1} * sd(d) / sqrt(n)`` (Student t). Tests: ``scipy.stats.ttest_rel`` and
    ``scipy.stats.wilcoxon`` (two-sided; zero differences dropped, "wilcox" method).
    """
    from scipy import stats

    _check_paired(averaged, raw)
    n = len(raw)
    diffs = [a - r for a, r in zip(averaged, raw)]
    d = summarise(diffs)
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * d.std / math.sqrt(n)
        lo, hi = d.mean - half, d.mean + half
    else:
        lo = hi = float("nan")
    t_p = float("nan")
    if n > 1 and d.std > 0:
        t_p = float(stats.ttest_rel(averaged, raw).pvalue)
    w_p = float("nan")
    if n > 1 and any(x != 0 for x in diffs):
        w_p = float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
    raw_s = summarise(raw)
    rel = d.mean / raw_s.mean if raw_s.mean != 0 else float("nan")
    wins, ties, losses = win_tie_loss(averaged, raw, higher_is_better=higher_is_better, tie_tolerance=tie_tolerance)
    return PairedComparison(
        n,
        raw_s,
        summarise(averaged),
        d.mean,
        lo,
        hi,
        rel,
        t_p,
        w_p,
        wins,
        ties,
        losses,
        tie_tolerance,
        higher_is_better,
    )


@dataclass(frozen=True)
class Stability:
    """Fluctuation of one validation curve over its late epochs: std (ddof=1) and max - min."""

    std: float
    range: float
    epochs: int


def curve_stability(curve: Sequence[float], late_fraction: float = 0.25) -> Stability:
    """Std and max-min of the last ``ceil(late_fraction * len(curve))`` values (at least 2)."""
    if not 0 < late_fraction <= 1:
        raise ValueError(f"late_fraction must be in (0, 1], got {late_fraction}")
    if len(curve) < 2:
        raise ValueError(f"curve_stability needs at least 2 epochs, got {len(curve)}")
    k = max(2, math.ceil(late_fraction * len(curve)))
    tail = list(curve[-k:])
    return Stability(summarise(tail).std, max(tail) - min(tail), k)


def early_stop_epoch(curve: Sequence[float], patience: int, *, higher_is_better: bool) -> tuple[int, int]:
    """Early stopping on a validation curve, replayed after the fact.

    Training stops after ``patience`` epochs without a strict improvement of the best value; the model
    kept is the best one seen. Returns ``(best_epoch, stop_epoch)`` as 0-based indices. Replaying it
    after the fact is exact: training up to the stop is a prefix of the full run.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(curve) == 0:
        raise ValueError("early_stop_epoch: empty curve")
    best, best_epoch = curve[0], 0
    for epoch, value in enumerate(curve):
        if (value > best) if higher_is_better else (value < best):
            best, best_epoch = value, epoch
        elif epoch - best_epoch >= patience:
            return best_epoch, epoch
    return best_epoch, len(curve) - 1
