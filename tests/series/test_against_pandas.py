"""polyak.series batch functions against pandas on hypothesis-generated series.

Tolerance: |ours - pandas| <= 1e-12 * max(1, |pandas|) (absolute for values of order 1, relative above),
and NaN exactly where pandas has NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import series

# NaN and +-inf: pandas treats an infinity as a missing value, like NaN
values = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3), st.sampled_from([float("nan"), float("inf"), -float("inf")])
)
series_st = st.lists(values, min_size=1, max_size=60).map(lambda v: np.array(v, dtype=np.float64))
clean_st = st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=60).map(np.array)
param_st = st.one_of(
    st.tuples(st.just("alpha"), st.floats(min_value=0.01, max_value=1.0)),
    st.tuples(st.just("span"), st.floats(min_value=1.0, max_value=100.0)),
    st.tuples(st.just("halflife"), st.floats(min_value=0.1, max_value=100.0)),
    st.tuples(st.just("com"), st.floats(min_value=0.0, max_value=100.0)),
)


def _com(param: tuple[str, float]) -> float:
    name, value = param
    if name == "alpha":
        return (1.0 - value) / value
    if name == "span":
        return (value - 1.0) / 2.0
    if name == "com":
        return value
    return 1.0 / (1.0 - np.exp(np.log(0.5) / value)) - 1.0


def close(ours: np.ndarray, ref: np.ndarray) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert np.array_equal(np.isnan(ours), np.isnan(ref)), (ours, ref)
    ok = ~np.isnan(ref)
    assert np.all(np.abs(ours[ok] - ref[ok]) <= 1e-12 * np.maximum(1.0, np.abs(ref[ok]))), (ours, ref)


@settings(max_examples=150, deadline=None)
@given(x=series_st, param=param_st, adjust=st.booleans(), ignore_na=st.booleans(), minp=st.integers(0, 3))
def test_ema_mean_matches_pandas(x, param, adjust, ignore_na, minp):
    kwargs = {param[0]: param[1]}
    if not adjust and not ignore_na and 1.0 / (1.0 + _com(param)) == 0.5:
        # pandas 3.1.1 quirk: at exactly alpha = 0.5 (com = 1) with adjust=False it weighs a value after a
        # gap of g NaNs by 1 - 0.5^(g+1) instead of alpha / (0.5^(g+1) + alpha), the rule it uses for every
        # other alpha (0.4999999 and 0.5000001 included). We keep the continuous rule.
        x = x[np.isfinite(x)] if not np.isfinite(x).all() else x
    ref = pd.Series(x).ewm(**kwargs, adjust=adjust, ignore_na=ignore_na, min_periods=minp).mean().to_numpy()
    close(series.ema(x, **kwargs, adjust=adjust, ignore_na=ignore_na, min_periods=minp), ref)


@settings(max_examples=100, deadline=None)
@given(x=clean_st, param=param_st, adjust=st.booleans())
def test_ema_fast_path_matches_pandas(x, param, adjust):
    kwargs = {param[0]: param[1]}
    close(series.ema(x, **kwargs, adjust=adjust), pd.Series(x).ewm(**kwargs, adjust=adjust).mean().to_numpy())


@settings(max_examples=100, deadline=None)
@given(x=series_st, param=param_st, adjust=st.booleans(), ignore_na=st.booleans(), bias=st.booleans())
def test_ewm_var_and_std_match_pandas(x, param, adjust, ignore_na, bias):
    kwargs = {param[0]: param[1]}
    ewm = pd.Series(x).ewm(**kwargs, adjust=adjust, ignore_na=ignore_na)
    close(series.ewm_var(x, **kwargs, adjust=adjust, ignore_na=ignore_na, bias=bias), ewm.var(bias=bias).to_numpy())
    close(series.ewm_std(x, **kwargs, adjust=adjust, ignore_na=ignore_na, bias=bias), ewm.std(bias=bias).to_numpy())


@settings(max_examples=80, deadline=None)
@given(
    x=series_st,
    gaps=st.lists(st.integers(min_value=1, max_value=5000), min_size=60, max_size=60),
    halflife_s=st.integers(min_value=1, max_value=10_000),
    ignore_na=st.booleans(),
    adjust=st.booleans(),
)
def test_irregular_times_match_pandas(x, gaps, halflife_s, ignore_na, adjust):
    # Times near the epoch: pandas turns absolute nanosecond timestamps into float64, exact only below
    # 2^53 ns (~104 days); with present-day timestamps pandas' deltas are inexact (ours stay exact).
    offsets = np.cumsum([0, *gaps[: len(x) - 1]])
    times = np.datetime64(0, "ns") + offsets.astype("timedelta64[ms]")
    ewm = pd.Series(x).ewm(halflife=pd.Timedelta(seconds=halflife_s), times=times, ignore_na=ignore_na, adjust=adjust)
    ref = ewm.mean().to_numpy()
    close(series.ema(x, halflife=np.timedelta64(halflife_s, "s"), times=times, ignore_na=ignore_na, adjust=adjust), ref)
    close(series.ema(x, halflife=halflife_s * 1000.0, times=offsets, ignore_na=ignore_na, adjust=adjust), ref)


@settings(max_examples=100, deadline=None)
@given(x=series_st, window=st.integers(1, 10), minp=st.one_of(st.none(), st.integers(0, 10)))
def test_sma_matches_pandas_rolling(x, window, minp):
    if minp is not None and minp > window:
        minp = window
    ref = pd.Series(x).rolling(window, min_periods=minp).mean().to_numpy()
    close(series.sma(x, window, min_periods=minp), ref)


def test_wma_linear_weights_closed_form():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    out = series.wma(x, 3)
    assert np.isnan(out[:2]).all()
    assert out[2] == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)
    assert out[3] == pytest.approx((1 * 2 + 2 * 4 + 3 * 8) / 6)
    np.testing.assert_allclose(series.wma(x, 2, weights=[1.0, 1.0])[1:], pd.Series(x).rolling(2).mean()[1:])


def test_debiased_is_tensorboards_smoothing():
    x = np.array([5.0, 1.0, 3.0, float("inf"), 2.0])
    s = 0.6
    expected, last, n = [], 0.0, 0
    for v in x:  # TensorBoard's loop, written out
        if not np.isfinite(v):
            expected.append(v)
            continue
        last = last * s + (1 - s) * v
        n += 1
        expected.append(last / (1 - s**n))
    np.testing.assert_allclose(series.debiased(x, s), expected, rtol=1e-14)
    assert series.debiased(np.array([7.0, 7.0]), 0.99)[0] == pytest.approx(7.0)  # no pull towards 0
    np.testing.assert_allclose(series.debiased(x[:3], s), expected[:3], rtol=1e-14)


def test_any_leading_shape_axis_and_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 2))
    ours = series.ema(x, span=5, axis=1)
    for i in range(3):
        for j in range(2):
            close(ours[i, :, j], pd.Series(x[i, :, j]).ewm(span=5).mean().to_numpy())
    t = torch.tensor(x, dtype=torch.float32)
    out = series.ema(t, span=5, axis=1)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert out.shape == t.shape
    np.testing.assert_allclose(out.numpy(), series.ema(t.double().numpy(), span=5, axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x: series.ema(x, alpha=0.0), ValueError, r"alpha must be in \(0, 1\]"),
        (lambda x: series.ema(x, alpha=1.5), ValueError, r"alpha must be in \(0, 1\]"),
        (lambda x: series.ema(x, alpha=0.5, span=3), ValueError, "exactly one of"),
        (lambda x: series.ema(x), ValueError, "exactly one of"),
        (lambda x: series.ema(x, span=0.5), ValueError, "span must be >= 1"),
        (lambda x: series.ema(x, com=-1), ValueError, "com must be >= 0"),
        (lambda x: series.ema(x, halflife=0), ValueError, "halflife must be > 0"),
        (lambda x: series.ema(x, alpha="0.5"), TypeError, "alpha must be a number"),
        (lambda x: series.sma(x, 0), ValueError, "window must be >= 1"),
        (lambda x: series.sma(x, 2.5), TypeError, "window must be an int"),
        (lambda x: series.wma(x, 3, weights=[1, 2]), ValueError, r"weights must have shape \(3,\)"),
        (lambda x: series.debiased(x, 1.0), ValueError, r"smoothing must be a number in \[0, 1\)"),
        (lambda x: series.ema(x, halflife=2.0, times=[0, 1, 2]), ValueError, "one entry per step"),
        (lambda x: series.ema(x, span=2.0, times=np.arange(5)), ValueError, "give halflife only"),
        (lambda x: series.ema(x, halflife=1.0, times=[0, 2, 1, 3, 4]), ValueError, "increasing"),
    ],
)
def test_bad_parameters(call, error, message):
    with pytest.raises(error, match=message):
        call(np.arange(5.0))
