"""Compensated prefix sums: window sums that survive cancellation, the same bits in batch and streaming.

A rolling sum taken as the difference of two plain cumulative sums, S_hi - S_lo, loses every digit below
the largest prefix: after one value of 1e16 the later windows of small values come out as multiples of 2.
Here each prefix is kept as three floats whose sum is the exact prefix to about 2^-150 of its size:
level 0 is the plain running sum s_t = fl(s_{t-1} + x_t); level 1 accumulates the rounding error of each
addition, recovered exactly by Knuth's TwoSum (err = (a - (s - (s - a))) + (b - (s - a)), so that
a + b = s + err exactly; Knuth, TAOCP vol. 2, 4.2.2); level 2 does the same for level 1. A window sum is
(s_hi - s_lo) + ((e1_hi - e1_lo) + (e2_hi - e2_lo)), exact whenever the window's true sum and the
residues are representable, e.g. pandas' GH 11645 case [0, 1, -9e33, 3, ...].

``prefix_sums`` (a whole series, vectorised over time with ``np.cumsum``, which adds left to right) and
``advance`` (one step of a stream) run the same float operations in the same order, so
``polyak.series.sma`` and ``SMAStream`` agree bit for bit.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]

LEVELS = 3  # s, e1, e2; a fourth row carries the count of observations


def _two_sum_err(a: F64, b: F64, s: F64) -> F64:
    """The exact rounding error of s = fl(a + b): a + b == s + err (TwoSum, no branch on |a| >= |b|)."""
    bb = s - a
    return np.asarray((a - (s - bb)) + (b - bb), dtype=np.float64)


def prefix_sums(values: F64, valid: F64) -> F64:
    """Prefix sums of ``values`` (NaN-free, shape (series, n)) as a (LEVELS + 1, series, n + 1) array:
    the compensated levels and, last, the running count ``valid`` (0/1). Column 0 is the empty prefix."""
    series, n = values.shape
    out = np.zeros((LEVELS + 1, series, n + 1))
    addend = values
    for level in range(LEVELS):
        np.cumsum(addend, axis=1, out=out[level, :, 1:])
        if level + 1 < LEVELS:
            addend = _two_sum_err(out[level, :, :-1], addend, out[level, :, 1:])
    np.cumsum(valid, axis=1, out=out[LEVELS, :, 1:])
    return out


def advance(prefix: F64, value: F64, valid: F64) -> F64:
    """The prefix after one more step (``prefix``: (LEVELS + 1, *shape)); the same operations as one
    column of ``prefix_sums``."""
    out = np.empty_like(prefix)
    addend = value
    for level in range(LEVELS):
        out[level] = prefix[level] + addend
        if level + 1 < LEVELS:
            addend = _two_sum_err(prefix[level], addend, out[level])
    out[LEVELS] = prefix[LEVELS] + valid
    return out


def window_sum(hi: F64, lo: F64) -> tuple[F64, F64]:
    """(sum, count) of the values between two prefixes (hi after lo), highest level last."""
    total = (hi[0] - lo[0]) + ((hi[1] - lo[1]) + (hi[2] - lo[2]))
    return np.asarray(total, dtype=np.float64), np.asarray(hi[LEVELS] - lo[LEVELS], dtype=np.float64)
