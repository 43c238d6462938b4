"""polyak.series at the extremes, against pandas itself: infinities, cancellation, pandas' argument
types, degenerate parameters and sizes, and ``polyak smooth`` writing over its own input."""

from __future__ import annotations

import datetime
import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import series
from polyak.cli import main

INF = math.inf


def same(ours: object, ref: object, rtol: float = 1e-12) -> None:
    """NaN exactly where pandas has NaN, values within rtol (relative above 1, absolute below)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, (a, b)
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    ok = ~np.isnan(b)
    assert np.all(np.abs(a[ok] - b[ok]) <= rtol * np.maximum(1.0, np.abs(b[ok]))), (a, b)


def bits(a: object) -> bytes:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes()


# --- 13: an infinity is a missing value, as in pandas ----------------------------------------------------
def test_inf_does_not_poison_ema() -> None:
    x = [1.0, INF, 2.0, 3.0, 4.0]
    ours = series.ema(x, span=3)
    same(ours, pd.Series(x).ewm(span=3).mean())
    np.testing.assert_allclose(ours, [1.0, 1.0, 1.8, 2.538461538, 3.344827586], rtol=1e-9)


@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("ignore_na", [True, False])
def test_inf_is_missing_in_ema_var_std(adjust: bool, ignore_na: bool) -> None:
    x = [2.0, -INF, 1.0, np.nan, INF, 5.0, 3.0, INF]
    kw = {"com": 1.5, "adjust": adjust, "ignore_na": ignore_na}
    ref = pd.Series(x).ewm(**kw)
    same(series.ema(x, **kw), ref.mean())
    same(series.ewm_var(x, **kw), ref.var())
    same(series.ewm_std(x, **kw), ref.std())
    same(series.ewm_var(x, bias=True, **kw), ref.var(bias=True))


def test_inf_is_missing_in_sma_wma_and_kalman() -> None:
    x = [1.0, INF, 2.0, 3.0, -INF, 4.0, 5.0, 6.0]
    for window, minp in ((3, None), (3, 1), (2, 0)):
        ref = pd.Series(x).rolling(window, min_periods=minp).mean()
        same(series.sma(x, window, min_periods=minp), ref)
    clean = np.array(x)
    clean[np.isinf(clean)] = np.nan
    same(series.wma(x, 2), series.wma(clean, 2))
    assert np.isfinite(series.wma(x, 2)[-2:]).all()
    same(
        series.kalman_local_level(x, process_var=0.1, obs_var=1.0).mean,
        series.kalman_local_level(clean, process_var=0.1, obs_var=1.0).mean,
    )


def test_inf_is_missing_in_streams_as_in_batch() -> None:
    x = [1.0, INF, 2.0, -INF, 3.0, 4.0]
    scalar = series.EWMStream(span=3)  # the Python-float path for one stream
    vector = series.EWMStream(2, span=3)  # the array path
    sma = series.SMAStream(window=2, min_periods=1)
    got_scalar, got_vector, got_sma = [], [], []
    for v in x:
        got_scalar.append(float(scalar.update(v)))
        got_vector.append(vector.update([v, v])[1])
        got_sma.append(float(sma.update(v)))
    assert bits(got_scalar) == bits(got_vector) == bits(series.ema(x, span=3))
    assert scalar.var == pytest.approx(pd.Series(x).ewm(span=3).var().iloc[-1], rel=1e-12)
    assert bits(got_sma) == bits(series.sma(x, 2, min_periods=1))


def test_smooth_treats_inf_as_missing(tmp_path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n0,1\n1,inf\n2,2\n3,3\n4,4\n")
    out = tmp_path / "out.csv"
    assert main(["smooth", str(path), "--column", "loss", "--span", "3", "--out", str(out)]) == 0
    got = pd.read_csv(out)["loss_smoothed"].to_numpy()
    same(got, pd.Series([1.0, INF, 2.0, 3.0, 4.0]).ewm(span=3).mean())


# --- 14: one large value does not cost the rest of the series its precision ------------------------------
def test_sma_after_a_huge_value_is_exact() -> None:
    x = [1e16, 1.0, 2.0, 3.0, 4.0]
    ours = series.sma(x, 2)
    assert bits(ours) == bits([np.nan, 5e15, 1.5, 2.5, 3.5])
    stream = series.SMAStream(window=2)
    assert bits([stream.update(v) for v in x]) == bits(ours)


def test_sma_pandas_gh11645_cancellation() -> None:
    x = [0.0, 1.0, -9e33, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    ours = series.sma(x, 5)
    assert list(ours[-3:]) == [5.0, 6.0, 7.0]
    same(ours, pd.Series(x).rolling(5).mean())
    stream = series.SMAStream(window=5)
    assert bits([stream.update(v) for v in x]) == bits(ours)


def _exact_sma(x: list[float], window: int) -> list[float]:
    out = []
    for t in range(len(x)):
        w = x[max(0, t - window + 1) : t + 1]
        out.append(float(sum(map(Fraction, w)) / len(w)) if len(w) == window else math.nan)
    return out


wide = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3),
    st.sampled_from([1e16, -1e16, 9e33, -9e33, 1e40, 3e-300]),
)


@settings(max_examples=80, deadline=None)
@given(x=st.lists(wide, min_size=1, max_size=40), window=st.integers(1, 6))
def test_sma_near_exact_and_stream_bit_identical(x: list[float], window: int) -> None:
    """Within 1e-12 (relative to the window's values) of the exact rational window mean, plus 2^-150 of
    the largest value so far (three compensated levels of 53 bits); ``SMAStream`` (several streams at
    once) gives the same bits as ``sma``. The old cumulative-sum difference missed by up to 2^-53 of
    the largest value so far (1.0 after 1e16)."""
    ours = series.sma(x, window)
    exact = _exact_sma(x, window)
    for t, (a, b) in enumerate(zip(ours, exact)):
        scale = max([1.0, *map(abs, x[max(0, t - window + 1) : t + 1])])
        far = max(map(abs, x[: t + 1]))
        if math.isnan(b):
            assert math.isnan(a)
        else:
            assert abs(a - b) <= 1e-12 * scale + 2.0**-150 * far * len(x), (t, a, b)
    batch = series.sma(np.stack([x, x[::-1]]), window)
    stream = series.SMAStream(2, window=window)
    steps = np.stack([stream.update([u, v]) for u, v in zip(x, x[::-1])], axis=1)
    assert bits(steps) == bits(batch)
    scalar = series.SMAStream(window=window)  # the Python-float path of a single stream
    assert bits([scalar.update(v) for v in x]) == bits(ours)
    restored = series.SMAStream(2, window=window)  # state_dict carries the compensated prefixes
    restored.load_state_dict(stream.state_dict())
    assert bits(restored.update([1.0, 2.0])) == bits(stream.update([1.0, 2.0]))


# --- 15: what pandas accepts --------------------------------------------------------------------------------
def _times(tz: str | None) -> pd.DatetimeIndex:
    base = pd.Timestamp("2026-03-28 22:00", tz=tz)
    offsets = pd.to_timedelta([0, 5, 13, 14, 30, 31, 60], unit="h")  # crosses a DST change in Europe
    return base + offsets


@pytest.mark.parametrize("tz", ["UTC", "Europe/Paris", "America/New_York"])
def test_tz_aware_times_and_string_halflife(tz: str) -> None:
    x = np.array([1.0, 4.0, 2.0, np.nan, 3.0, 8.0, 5.0])
    times = _times(tz)
    ref = pd.Series(x).ewm(halflife="1 day", times=times).mean()
    same(series.ema(x, halflife="1 day", times=times), ref)
    same(series.ema(x, halflife="1 day", times=pd.Series(times)), ref)
    same(series.ema(x, halflife=pd.Timedelta("1 day"), times=list(times.to_pydatetime())), ref)
    same(series.ema(x, halflife=datetime.timedelta(hours=24), times=np.asarray(times)), ref)


def test_timedelta_halflife_errors_are_clear() -> None:
    times = _times("UTC")
    x = np.arange(7.0)
    with pytest.raises(ValueError, match="not a timedelta pandas can read"):
        series.ema(x, halflife="one day", times=times)
    with pytest.raises(TypeError, match="halflife must be a timedelta"):
        series.ema(x, halflife=1.0, times=times)
    with pytest.raises(TypeError, match="needs times"):
        series.ema(x, halflife="1 day")
    mixed = list(times.to_pydatetime())
    mixed[0] = mixed[0].replace(tzinfo=None)
    with pytest.raises(ValueError, match="timezone-aware and naive"):
        series.ema(x, halflife="1 day", times=mixed)


def test_numpy_scalar_parameters() -> None:
    x = np.array([1.0, 3.0, np.nan, 2.0, 5.0, 4.0])
    same(series.ema(x, span=np.float32(5)), pd.Series(x).ewm(span=np.float32(5)).mean())
    same(series.ema(x, com=np.int64(2)), pd.Series(x).ewm(com=np.int64(2)).mean())
    same(series.ewm_std(x, alpha=np.float64(0.3)), pd.Series(x).ewm(alpha=0.3).std())
    same(
        series.ema(x, halflife=np.float32(2.0), times=np.arange(6.0)), series.ema(x, halflife=2.0, times=np.arange(6.0))
    )
    same(series.sma(x, np.int64(3), min_periods=np.int32(1)), pd.Series(x).rolling(3, min_periods=1).mean())
    same(series.wma(x, np.int64(2)), series.wma(x, 2))
    assert series.SMAStream(window=np.int64(2)).window == 2
    assert series.EWMStream(span=np.float32(5)).alpha == pytest.approx(1 / 3)
    assert series.DebiasedStream(smoothing=np.float32(0.5)).smoothing == 0.5
    with pytest.raises(TypeError, match="window must be an int"):
        series.sma(x, True)
    with pytest.raises(TypeError, match="span must be a real number"):
        series.ema(x, span=torch.tensor(5.0))


# --- 16: degenerate parameters and sizes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "param",
    [
        {"span": 1e16},
        {"span": 1e17},
        {"com": 1e17},
        {"halflife": 1e16},
        {"halflife": 1e300},
        {"alpha": 1e-300},
        {"alpha": 5e-324},
    ],
)
@pytest.mark.parametrize("adjust", [True, False])
def test_huge_span_or_tiny_alpha_is_pandas_expanding_mean(param: dict[str, float], adjust: bool) -> None:
    x = np.array([1.0, 5.0, np.nan, 2.0, 7.0])
    clean = x[~np.isnan(x)]  # the linear-filter path, taken when there is no NaN
    with np.errstate(divide="ignore"):  # pandas divides by 0 at halflife=1e300 (and returns the right thing)
        ref = pd.Series(x).ewm(**param, adjust=adjust)
        ref_clean = pd.Series(clean).ewm(**param, adjust=adjust).mean()
    same(series.ema(x, **param, adjust=adjust), ref.mean())
    same(series.ema(clean, **param, adjust=adjust), ref_clean)
    same(series.ewm_var(x, **param, adjust=adjust), ref.var())
    if adjust:
        same(series.ema(x, **param), pd.Series(x).expanding().mean())


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: series.ema(x, span=3),
        lambda x: series.ewm_var(x, span=3),
        lambda x: series.ewm_std(x, span=3),
        lambda x: series.ema(x, halflife=1.0, times=np.zeros(0)),
        lambda x: series.sma(x, 3),
        lambda x: series.wma(x, 3),
        lambda x: series.debiased(x, 0.5),
        lambda x: series.kalman_local_level(x, process_var=1.0, obs_var=1.0).mean,
    ],
)
def test_empty_input_gives_empty_output(fn) -> None:
    assert pd.Series([], dtype=float).ewm(span=3).mean().size == 0  # what pandas does
    assert np.asarray(fn(np.zeros(0))).shape == (0,)
    assert np.asarray(fn(np.zeros((3, 0)))).shape == (3, 0)
    out = fn(torch.zeros(0))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (0,)


def test_wma_huge_window_allocates_nothing_large() -> None:
    x = np.arange(7.0)
    tracemalloc.start()
    try:
        out = series.wma(x, 10**9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isnan(out).all()
    assert out.shape == (7,)
    assert peak < 1 << 20  # bytes; the old code asked for 8 GB of weights
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        series.wma(x, 3, weights=[1.0, 2.0])


@pytest.mark.parametrize("window", ["0", "-2"])
def test_smooth_window_below_one_is_an_error(tmp_path, capsys, window: str) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n" + "".join(f"{i},{i}\n" for i in range(30)))
    for method in ("sma", "wma"):
        assert main(["smooth", str(path), "--column", "loss", "--method", method, "--window", window]) == 2
        assert "--window must be >= 1" in capsys.readouterr().err


# --- 8 (smooth part): --out onto its own input --------------------------------------------------------------
def test_smooth_out_onto_its_input_with_a_ragged_row_changes_nothing(tmp_path, capsys) -> None:
    path = tmp_path / "log.csv"
    original = b"step,loss\n0,1.0\n1,2.0,extra\n2,3.0\n"
    path.write_bytes(original)
    assert main(["smooth", str(path), "--column", "loss", "--out", str(path)]) == 2
    assert "3 fields, but the header has 2" in capsys.readouterr().err
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]  # no temporary file left behind


def test_smooth_out_onto_its_input_adds_then_replaces_the_column(tmp_path) -> None:
    path = tmp_path / "log.csv"
    x = [1.0, 4.0, 2.0, 8.0, 5.0]
    path.write_text("step,loss,note\n" + "".join(f"{i},{v},a b\n" for i, v in enumerate(x)))
    for span in ("3", "2"):  # the second run replaces loss_smoothed instead of adding a second one
        assert main(["smooth", str(path), "--column", "loss", "--span", span, "--out", str(path)]) == 0
        table = pd.read_csv(path)
        assert list(table.columns) == ["step", "loss", "note", "loss_smoothed"]
        same(table["loss_smoothed"], pd.Series(x).ewm(span=float(span)).mean())
        assert list(table["note"]) == ["a b"] * 5


def test_smooth_out_jsonl_rows_with_different_keys(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 3.0, "lr": 0.1}\n{"step": 2, "loss": 2.0}\n')
    out = tmp_path / "out.csv"
    assert main(["smooth", str(path), "--column", "loss", "--span", "2", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["step", "loss", "lr", "loss_smoothed"]
    same(table["loss_smoothed"], pd.Series([1.0, 3.0, 2.0]).ewm(span=2).mean())


def test_sma_stream_loads_a_state_saved_before_the_compensated_sums() -> None:
    """States written by earlier versions hold the raw window (``buffer``, ``count``): they still load."""
    x = np.array([[3.0, np.nan, 1e16, 2.0, 5.0, 7.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    for seen in (2, 5):  # a window not yet full, and one that has wrapped around
        window = 3
        buffer = np.full((window, 2), np.nan)
        for t in range(seen):
            buffer[t % window] = x[:, t]
        stream = series.SMAStream(2, window=window, min_periods=1)
        stream.load_state_dict({"buffer": buffer, "count": np.asarray(seen)})
        rest = np.stack([stream.update(x[:, t]) for t in range(seen, x.shape[1])], axis=1)
        same(rest, series.sma(x, window, min_periods=1)[:, seen:])
    with pytest.raises(ValueError, match="'buffer' has shape"):
        series.SMAStream(window=3).load_state_dict({"buffer": np.zeros(2), "count": 0})


def test_smooth_kalman_default_noise_ignores_inf(tmp_path) -> None:
    """The default observation noise is the variance of the valid values (it was NaN with an inf, an error)."""
    path = tmp_path / "log.csv"
    x = [1.0, 4.0, INF, 2.0, 8.0, 5.0]
    path.write_text("loss\n" + "".join(f"{v}\n" for v in x))
    out = tmp_path / "out.csv"
    assert main(["smooth", str(path), "--column", "loss", "--method", "kalman", "--span", "3", "--out", str(out)]) == 0
    valid = np.array([v for v in x if math.isfinite(v)])
    r = float(np.var(valid))
    q = r * 0.5 * 0.5 / 0.5  # alpha = 2 / (span + 1) = 0.5: q = r a^2 / (1 - a)
    expected = series.kalman_local_level(np.array(x), process_var=q, obs_var=r).mean
    same(pd.read_csv(out)["loss_smoothed"], expected)
    assert np.isfinite(expected).all()


def test_sma_stream_huge_window_costs_only_the_steps_seen() -> None:
    x = np.random.default_rng(0).normal(size=300)
    tracemalloc.start()
    try:
        stream = series.SMAStream(window=10**9, min_periods=1)
        got = [stream.update(v) for v in x]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # bytes; a ring of 10^9 + 1 prefixes would be 32 GB
    assert bits(got) == bits(series.sma(x, 10**9, min_periods=1))
    same(got, pd.Series(x).expanding().mean())
    two = series.SMAStream(2, window=10**9, min_periods=1)  # the array path grows the same ring
    both = np.stack([x, -x])
    assert bits(np.stack([two.update(col) for col in both.T], axis=1)) == bits(series.sma(both, 10**9, min_periods=1))
    # the grown ring round-trips through state_dict, and a wrong one is refused with its expected shape
    other = series.SMAStream(window=10**9, min_periods=1)
    other.load_state_dict(stream.state_dict())
    assert bits(other.update(1.5)) == bits(stream.update(1.5))
    with pytest.raises(ValueError, match=r"'prefix' has shape \(3, 4\), expected \(302\.\.1000000001, 4\)"):
        other.load_state_dict({"prefix": np.zeros((3, 4)), "count": 301})
