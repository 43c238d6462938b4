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
    """The exact rounding error of s = fl(a + b): a + b == s + err (TwoSum, no branch on |a| >= |b|),
    computed as (a - (s - (s - a))) + (b - (s - a))."""
    bb = s - a
    return np.asarray((a - (s - bb)) + (b - bb), dtype=np.float64)


def prefix_sums(values: F64, valid: F64) -> list[F64]:
    """Prefix sums after steps 1..n of ``values`` (NaN-free, shape (series, n)): the LEVELS compensated
    levels and, last, the running count of ``valid`` (0/1), each of shape (series, n)."""
    levels: list[F64] = []
    addend = values
    for level in range(LEVELS):
        running = np.cumsum(addend, axis=1)
        levels.append(running)
        if level + 1 < LEVELS:
            before = np.empty_like(running)
            before[:, 0] = 0.0
            before[:, 1:] = running[:, :-1]
            addend = _two_sum_err(before, addend, running)
    levels.append(np.cumsum(valid, axis=1))
    return levels


def rolling_sums(prefix: list[F64], window: int) -> tuple[F64, F64]:
    """(sum, count) of the last ``window`` steps at every step, from ``prefix_sums``: the window before
    step ``window`` starts at the empty prefix (all levels 0). The same operations as ``window_sum``."""
    total = np.empty_like(prefix[0])
    count = np.empty_like(prefix[0])
    head = min(window, total.shape[1])
    # x - 0.0 == x bit for bit (also for -0.0), so the head runs window_sum's formula against zeros.
    total[:, :head] = prefix[0][:, :head] + (prefix[1][:, :head] + prefix[2][:, :head])
    count[:, :head] = prefix[LEVELS][:, :head]
    if head < total.shape[1]:
        hi = [level[:, window:] for level in prefix]
        lo = [level[:, :-window] for level in prefix]
        total[:, window:] = (hi[0] - lo[0]) + ((hi[1] - lo[1]) + (hi[2] - lo[2]))
        count[:, window:] = hi[LEVELS] - lo[LEVELS]
    return total, count


def advance(prefix: F64, value: F64, valid: F64) -> F64:
    """The prefix after one more step (``prefix``: (LEVELS + 1, *shape), levels then count); the same
    operations as one step of ``prefix_sums``."""
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
