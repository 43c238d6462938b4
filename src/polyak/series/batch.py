"""Moving averages over whole arrays (NumPy or torch), along an axis, any leading shape.

``ema``/``ewm_var``/``ewm_std`` reproduce ``pandas.Series.ewm(...).mean()/var()/std()`` (NaN handling,
``adjust``, ``ignore_na``, ``min_periods``, irregular ``times``; +-inf is a missing value, as in pandas);
``sma`` reproduces ``rolling(window).mean()``.
The common case (no NaN, regular steps) runs as a linear filter (``scipy.signal.lfilter``) over all
series at once; NaNs and irregular times use the exact pandas recursion, vectorised across series and
looping over time steps (see ``polyak.series.streaming.EWMStream``).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from polyak._validate import as_float
from polyak.series import _sums
from polyak.series._params import check_min_periods, check_window, missing_inf, resolve_alpha
from polyak.series.streaming import DebiasedStream, EWMStream, window_mean, wma_weights

__all__ = ["debiased", "ema", "ewm_std", "ewm_var", "sma", "wma"]

F64 = NDArray[np.float64]
T = TypeVar("T")


def _apply(x: Any, axis: int, fn: Callable[[F64], F64]) -> Any:
    """Run ``fn`` on a float64 (series, time) view of ``x`` and give the result back in x's type/shape."""
    torch_like = type(x).__module__.startswith("torch")
    if torch_like:
        arr = x.detach().to("cpu").double().numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError("expected an array with at least one axis, got a scalar")
    moved = np.moveaxis(arr, axis, -1)
    if moved.size == 0:  # no series or no steps: an empty result of the same shape (pandas: an empty Series)
        out = np.array(arr, copy=True)
    else:
        flat = np.ascontiguousarray(moved.reshape(-1, moved.shape[-1]))
        out = np.moveaxis(fn(flat).reshape(moved.shape), -1, axis)
    if torch_like:
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float64
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=dtype)
    return out


def _lfilter(b: list[float], a: list[float], x: F64, zi: F64 | None = None) -> F64:
    from scipy.signal import lfilter

    if zi is None:
        return np.asarray(lfilter(b, a, x, axis=-1), dtype=np.float64)
    y, _ = lfilter(b, a, x, axis=-1, zi=zi)
    return np.asarray(y, dtype=np.float64)


def _ewm_recursion(flat: F64, stream: EWMStream, elapsed: F64 | None, out: Callable[[EWMStream], F64]) -> F64:
    result = np.empty_like(flat)
    for t in range(flat.shape[1]):
        stream.update(flat[:, t], elapsed=1.0 if elapsed is None or t == 0 else elapsed[t - 1])
        result[:, t] = out(stream)
    return result


def _elapsed(times: Any, halflife: Any, n: int) -> F64:
    """(t_i - t_{i-1}) / halflife; datetime times need a timedelta halflife, numbers need a number.

    Datetimes may be datetime64, timezone-aware pandas data (converted to UTC, as pandas does) or
    ``datetime.datetime`` objects; a timedelta halflife may be a ``numpy.timedelta64``, a
    ``datetime.timedelta``/``pandas.Timedelta`` or a string pandas reads (``"1 day"``, ``"90min"``).
    Differences are taken in int64 nanoseconds before converting to float: pandas converts the absolute
    timestamps to float64 first, which rounds present-day nanosecond times (~1.8e18 > 2^53) and shifts
    each delta by up to ~1e-4 relative; ours are exact.
    """
    dates = _datetimes(times)
    t = np.asarray(times) if dates is None else dates
    if t.shape != (n,):
        raise ValueError(f"times must be 1-D with one entry per step ({n}), got shape {t.shape}")
    if dates is not None:
        diffs = np.diff(dates).astype("timedelta64[ns]").astype(np.float64)
        unit = _timedelta_ns(halflife)
    else:
        if not np.issubdtype(t.dtype, np.number):
            raise TypeError(f"times must be numbers or datetimes, got an array of {t.dtype}")
        diffs = np.diff(t.astype(np.float64))
        if isinstance(halflife, str):
            raise TypeError(f"with numeric times, halflife must be a number, got {halflife!r}")
        try:
            unit = as_float(halflife, "halflife")
        except TypeError:
            raise TypeError(f"with numeric times, halflife must be a number, got {halflife!r}") from None
    if not unit > 0:
        raise ValueError(f"halflife must be > 0, got {halflife!r}")
    if np.isnan(diffs).any() or (diffs < 0).any():
        raise ValueError("times must be increasing and contain no NaT/NaN")
    return np.asarray(diffs / unit, dtype=np.float64)


def _datetimes(times: Any) -> NDArray[np.datetime64] | None:
    """``times`` as naive UTC datetime64 when they are datetimes (None for numbers)."""
    if getattr(getattr(times, "dtype", None), "tz", None) is not None:  # tz-aware pandas Series/Index/array
        import pandas as pd

        return np.asarray(pd.DatetimeIndex(times).tz_convert("UTC").tz_localize(None).to_numpy())
    t = np.asarray(times)
    if np.issubdtype(t.dtype, np.datetime64):
        return t
    if t.dtype != object or t.size == 0 or not all(isinstance(v, datetime.datetime) for v in t.flat):
        return None
    aware = [v.utcoffset() is not None for v in t.flat]
    if any(aware) and not all(aware):
        raise ValueError("times mixes timezone-aware and naive datetimes; give all of them a timezone or none")
    if all(aware):
        t = np.array([v.astimezone(datetime.timezone.utc).replace(tzinfo=None) for v in t.flat], dtype=object)
    return np.asarray(t.astype("datetime64[ns]"))


def _timedelta_ns(halflife: Any) -> float:
    """A timedelta halflife in nanoseconds (float)."""
    value = halflife
    if isinstance(value, str):
        try:
            import pandas as pd
        except ImportError:
            raise TypeError(
                f"a string halflife ({value!r}) needs pandas to read it; pass numpy.timedelta64 or "
                "datetime.timedelta instead"
            ) from None
        try:
            value = pd.Timedelta(value)
        except ValueError:
            raise ValueError(f"halflife {value!r} is not a timedelta pandas can read (e.g. '1 day', '90min')") from None
    if hasattr(value, "to_timedelta64"):  # pandas.Timedelta keeps its nanoseconds this way
        value = value.to_timedelta64()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (np.timedelta64, datetime.timedelta)):
        raise TypeError(f"with datetime times, halflife must be a timedelta, got {halflife!r}")
    return float(np.timedelta64(value).astype("timedelta64[ns]").astype(np.float64))


def _ewm(
    x: Any,
    what: str,
    *,
    alpha: float | None,
    span: float | None,
    halflife: Any,
    com: float | None,
    adjust: bool,
    ignore_na: bool,
    times: ArrayLike | None,
    min_periods: int,
    axis: int,
    bias: bool = False,
) -> Any:
    if times is not None:
        for name, value in (("alpha", alpha), ("span", span), ("com", com)):
            if value is not None:
                raise ValueError(f"with times=..., give halflife only (got {name})")
        if halflife is None:
            raise ValueError("with times=..., give halflife (in the units of times)")
        a = 0.5
    else:
        a = resolve_alpha(alpha=alpha, span=span, halflife=halflife, com=com)
    minp = max(check_min_periods(min_periods, 0), 1)

    def run(flat: F64) -> F64:
        flat = missing_inf(flat)
        n = flat.shape[1]
        elapsed = _elapsed(times, halflife, n) if times is not None else None
        # 1 - alpha == 1 (a huge span/com/halflife, a tiny alpha): equal weights, pandas' recursion
        if what == "mean" and elapsed is None and 1.0 - a < 1.0 and not np.isnan(flat).any():
            return _fast_mean(flat, a, adjust, minp)
        stream = EWMStream(
            flat.shape[0],
            # the caller's own parameter, resolved the same way (a resolved alpha of 0 is not a valid input)
            **({} if times is not None else {"alpha": alpha, "span": span, "halflife": halflife, "com": com}),
            adjust=adjust,
            ignore_na=ignore_na,
            min_periods=minp,
            decay_per_unit=0.5 if times is not None else None,
        )
        if what == "mean":
            return _ewm_recursion(flat, stream, elapsed, lambda s: s.value)
        if what == "var":
            return _ewm_recursion(flat, stream, elapsed, lambda s: s.variance(bias=bias))
        return _ewm_recursion(flat, stream, elapsed, lambda s: np.sqrt(s.variance(bias=bias)))

    return _apply(x, axis, run)


def _fast_mean(flat: F64, a: float, adjust: bool, minp: int) -> F64:
    beta = 1.0 - a
    if adjust:
        numerator = _lfilter([1.0], [1.0, -beta], flat)
        n = flat.shape[1]
        if beta > 0.0:
            # sum_{i<t} beta^i = (1 - beta^t) / (1 - beta); -expm1(t ln beta) is 1 - beta^t without the
            # cancellation near beta = 1. Once beta^t < 2^-60 the sum is 1 / (1 - beta) to the last bit,
            # so only the head needs the exponential.
            head = min(n, math.ceil(-60.0 * math.log(2.0) / math.log(beta)) + 1)
            steps = np.arange(1, head + 1, dtype=np.float64)
            out = numerator * (1.0 - beta)
            out[:, :head] = numerator[:, :head] / (-np.expm1(steps * math.log(beta)) / (1.0 - beta))
        else:
            out = numerator
    else:
        out = _lfilter([a], [1.0, -beta], flat, zi=beta * flat[:, :1])
    if minp > 1:
        out[:, : minp - 1] = np.nan
    return out


def ema(
    x: Any,
    *,
    alpha: float | None = None,
    span: float | None = None,
    halflife: Any = None,
    com: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    times: ArrayLike | None = None,
    min_periods: int = 0,
    axis: int = -1,
) -> Any:
    """Exponential moving average with ``pandas.Series.ewm(...).mean()`` semantics.

    alpha = 1/(1+com) = 2/(span+1) = 1 - exp(-ln2/halflife) (give exactly one). ``adjust=True``:
    y_t = sum_i (1-alpha)^(t-i) x_i / sum_i (1-alpha)^(t-i); ``adjust=False``: y_t = (1-alpha) y_{t-1} + alpha x_t.
    With ``times`` (numbers, or datetime64 with a timedelta ``halflife``) a weight halves every ``halflife``.
    NaN and +-inf are missing values: see ``EWMStream``. Numpy scalars are accepted as parameters.
    """
    return _ewm(
        x,
        "mean",
        alpha=alpha,
        span=span,
        halflife=halflife,
        com=com,
        adjust=adjust,
        ignore_na=ignore_na,
        times=times,
        min_periods=min_periods,
        axis=axis,
    )


def ewm_var(
    x: Any,
    *,
    alpha: float | None = None,
    span: float | None = None,
    halflife: float | None = None,
    com: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    min_periods: int = 0,
    bias: bool = False,
    axis: int = -1,
) -> Any:
    """Exponentially weighted variance, ``pandas.Series.ewm(...).var(bias=...)`` (default unbiased)."""
    return _ewm(
        x,
        "var",
        alpha=alpha,
        span=span,
        halflife=halflife,
        com=com,
        adjust=adjust,
        ignore_na=ignore_na,
        times=None,
        min_periods=min_periods,
        axis=axis,
        bias=bias,
    )


def ewm_std(
    x: Any,
    *,
    alpha: float | None = None,
    span: float | None = None,
    halflife: float | None = None,
    com: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    min_periods: int = 0,
    bias: bool = False,
    axis: int = -1,
) -> Any:
    """Exponentially weighted standard deviation, ``pandas.Series.ewm(...).std(bias=...)``."""
    return _ewm(
        x,
        "std",
        alpha=alpha,
        span=span,
        halflife=halflife,
        com=com,
        adjust=adjust,
        ignore_na=ignore_na,
        times=None,
        min_periods=min_periods,
        axis=axis,
        bias=bias,
    )


def sma(x: Any, window: int, *, min_periods: int | None = None, axis: int = -1) -> Any:
    """Simple moving average of the last ``window`` values, ``pandas.Series.rolling(window).mean()``:
    NaN and +-inf are skipped and the result is NaN until ``min_periods`` (default ``window``) values are
    present. Window sums are differences of compensated prefix sums (``polyak.series._sums``): one huge
    value does not cost the later windows their precision, and ``SMAStream`` gives the same bits."""
    window = check_window(window)
    minp = check_min_periods(min_periods, window)

    def run(flat: F64) -> F64:
        flat = missing_inf(flat)
        valid = ~np.isnan(flat)
        prefix = _sums.prefix_sums(np.where(valid, flat, 0.0), valid.astype(np.float64))
        total, count = _sums.rolling_sums(prefix, window)
        return window_mean(total, count, minp)

    return _apply(x, axis, run)


def wma(x: Any, window: int, weights: ArrayLike | None = None, *, axis: int = -1) -> Any:
    """Weighted moving average: sum_j w_j x_{t-window+j} / sum_j w_j, ``weights[-1]`` on the newest value
    (default linear 1..window). NaN for the first ``window - 1`` steps and wherever the window holds a NaN
    or an infinity. The default weights are built only when the series is at least ``window`` long."""
    window = check_window(window)
    given = None if weights is None else wma_weights(window, weights)  # validated before any work

    def run(flat: F64) -> F64:
        out = np.full_like(flat, np.nan)
        if flat.shape[1] >= window:
            w = wma_weights(window, None) if given is None else given
            flat = missing_inf(flat)
            views = np.lib.stride_tricks.sliding_window_view(flat, window, axis=1)
            out[:, window - 1 :] = views @ w / w.sum()
        return out

    return _apply(x, axis, run)


def debiased(x: Any, smoothing: float, *, axis: int = -1) -> Any:
    """TensorBoard's smoothing slider: an EMA from zero with weight ``smoothing`` on the past, divided by
    1 - smoothing^n (Adam's bias correction), so the first point is not pulled towards 0."""
    probe = DebiasedStream((), smoothing=smoothing)  # validates smoothing

    def run(flat: F64) -> F64:
        if np.isfinite(flat).all():
            s = probe.smoothing
            last = _lfilter([1.0 - s], [1.0, -s], flat)
            n = np.arange(1, flat.shape[1] + 1, dtype=np.float64)
            return np.asarray(last / (1.0 - s**n), dtype=np.float64)
        stream = DebiasedStream(flat.shape[0], smoothing=smoothing)
        out = np.empty_like(flat)
        for t in range(flat.shape[1]):
            out[:, t] = stream.update(flat[:, t])
        return out

    return _apply(x, axis, run)
