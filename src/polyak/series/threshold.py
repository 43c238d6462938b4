"""Alert thresholds from moving statistics: EMA mean ± k · EM std, judged before folding the new value."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from polyak.series.batch import _apply
from polyak.series.streaming import EWMStream

__all__ = ["AnomalyStream", "Bands", "ema_bands"]


class Bands(NamedTuple):
    mean: Any  # EMA of the values before t
    lower: Any  # mean - k * std
    upper: Any  # mean + k * std
    anomaly: Any  # x_t outside [lower_t, upper_t] (False while the statistics are warming up)


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise ValueError(f"k must be a positive number of standard deviations, got {k!r}")
    return float(k)


class AnomalyStream:
    """Streaming alert: ``update(x)`` flags values further than ``k`` EM standard deviations from the EMA of
    the previous values, then folds x in. No flag before ``warmup`` observations. Vectorised over
    ``shape`` streams; NaNs are never flagged and not folded (``ignore_na=True``)."""

    def __init__(
        self,
        shape: int | tuple[int, ...] = (),
        *,
        k: float = 3.0,
        warmup: int = 10,
        alpha: float | None = None,
        span: float | None = None,
        halflife: float | None = None,
        com: float | None = None,
    ) -> None:
        self.k = _check_k(k)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
            raise ValueError(f"warmup must be an int >= 2, got {warmup!r}")
        self.warmup = warmup
        self.stats = EWMStream(shape, alpha=alpha, span=span, halflife=halflife, com=com, ignore_na=True)

    def bands(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        mean, std = self.stats.value, self.stats.std
        return mean, mean - self.k * std, mean + self.k * std

    def update(self, x: ArrayLike) -> NDArray[np.bool_]:
        arr = np.asarray(x, dtype=np.float64)
        _, lower, upper = self.bands()
        ready = self.stats.nobs >= self.warmup
        with np.errstate(invalid="ignore"):
            flag = ready & ~np.isnan(arr) & ((arr < lower) | (arr > upper))
        self.stats.update(arr)
        return np.asarray(flag, dtype=bool)


def ema_bands(
    x: Any,
    *,
    k: float = 3.0,
    warmup: int = 10,
    alpha: float | None = None,
    span: float | None = None,
    halflife: float | None = None,
    com: float | None = None,
    axis: int = -1,
) -> Bands:
    """``AnomalyStream`` over a whole array: bands at t from the values before t, and the flags."""
    _check_k(k)
    out: dict[str, NDArray[np.float64]] = {}

    def run(flat: NDArray[np.float64]) -> NDArray[np.float64]:
        stream = AnomalyStream(flat.shape[0], k=k, warmup=warmup, alpha=alpha, span=span, halflife=halflife, com=com)
        mean, lower, upper, flags = (np.empty_like(flat) for _ in range(4))
        for t in range(flat.shape[1]):
            mean[:, t], lower[:, t], upper[:, t] = stream.bands()
            flags[:, t] = stream.update(flat[:, t])
        out.update(lower=lower, upper=upper, flags=flags)
        return mean

    mean = _apply(x, axis, run)
    lower = _apply(x, axis, lambda _f: out["lower"])
    upper = _apply(x, axis, lambda _f: out["upper"])
    flags = _apply(x, axis, lambda _f: out["flags"])
    if isinstance(flags, np.ndarray):
        flags = flags.astype(bool)
    else:
        flags = flags.bool()
    return Bands(mean, lower, upper, flags)
