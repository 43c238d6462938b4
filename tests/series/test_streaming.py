"""Streams give the batch numbers value by value, for many streams at once, and round-trip their state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import series


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 80))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.03] = np.inf  # a missing value too, as in pandas
    x[rng.random(x.shape) < 0.03] = -np.inf
    return x


@pytest.mark.parametrize(("adjust", "ignore_na"), [(True, False), (True, True), (False, False), (False, True)])
def test_ewm_stream_equals_batch(data, adjust, ignore_na):
    stream = series.EWMStream(4, span=7, adjust=adjust, ignore_na=ignore_na)
    means, stds = [], []
    for t in range(data.shape[1]):
        means.append(stream.update(data[:, t]))
        stds.append(stream.std)
    np.testing.assert_array_equal(np.stack(means, 1), series.ema(data, span=7, adjust=adjust, ignore_na=ignore_na))
    np.testing.assert_array_equal(np.stack(stds, 1), series.ewm_std(data, span=7, adjust=adjust, ignore_na=ignore_na))


def test_sma_wma_debiased_streams_equal_batch(data):
    clean = np.where(np.isfinite(data), data, 0.0)
    sma, wma, deb = (
        series.SMAStream(4, window=5),
        series.WMAStream(4, window=5),
        series.DebiasedStream(4, smoothing=0.8),
    )
    out = [(sma.update(data[:, t]), wma.update(clean[:, t]), deb.update(data[:, t])) for t in range(data.shape[1])]
    np.testing.assert_array_equal(np.stack([o[0] for o in out], 1), series.sma(data, 5))  # the same bits
    np.testing.assert_allclose(np.stack([o[1] for o in out], 1), series.wma(clean, 5), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.stack([o[2] for o in out], 1), series.debiased(data, 0.8), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip(data):
    a = series.EWMStream(4, alpha=0.3)
    for t in range(40):
        a.update(data[:, t])
    b = series.EWMStream(4, alpha=0.3)
    b.load_state_dict(a.state_dict())
    for t in range(40, 80):
        np.testing.assert_array_equal(a.update(data[:, t]), b.update(data[:, t]))
    s = series.SMAStream(4, window=3)
    s.update(data[:, 0])
    s2 = series.SMAStream(4, window=3)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(s.update(data[:, 1]), s2.update(data[:, 1]))


def test_bad_state_and_shapes():
    stream = series.EWMStream(3, alpha=0.5)
    with pytest.raises(ValueError, match=r"expects values of shape \(3,\)"):
        stream.update(np.zeros(4))
    with pytest.raises(ValueError, match="missing"):
        stream.load_state_dict({"mean": np.zeros(3)})
    bad = stream.state_dict()
    bad["cov"] = np.zeros(5)
    with pytest.raises(ValueError, match="has shape"):
        stream.load_state_dict(bad)
    stream.update(2.0)  # a scalar broadcasts to every stream
    np.testing.assert_array_equal(stream.value, [2.0, 2.0, 2.0])


# --- the one-stream fast path (Python floats) against the array path --------------------------------------

_VALUES = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.just(float("nan")),
    st.just(0.0),
    st.sampled_from([1e300, -1e300, float("inf")]),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.tuples(_VALUES, st.sampled_from([1.0, 0.0, 0.5, 2.5])), min_size=1, max_size=30),
    alpha=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
    adjust=st.booleans(),
    ignore_na=st.booleans(),
    continuous=st.booleans(),
    min_periods=st.integers(0, 3),
)
def test_scalar_stream_gives_the_bits_of_a_one_element_array_stream(
    values: list[tuple[float, float]], alpha: float, adjust: bool, ignore_na: bool, continuous: bool, min_periods: int
) -> None:
    kwargs = {"adjust": adjust, "ignore_na": ignore_na, "min_periods": min_periods}
    if continuous:
        scalar, array = (series.EWMStream(s, decay_per_unit=1 - alpha, **kwargs) for s in ((), 1))
    else:
        scalar, array = (series.EWMStream(s, alpha=alpha, **kwargs) for s in ((), 1))
    with np.errstate(all="ignore"):  # huge values overflow to inf in both paths alike
        for x, elapsed in values:
            got = scalar.update(x, elapsed=elapsed)
            want = array.update(np.array([x]), elapsed=elapsed)
            assert got.shape == ()
            np.testing.assert_array_equal(got, want[0])
        for name in ("var", "std"):
            np.testing.assert_array_equal(getattr(scalar, name), getattr(array, name)[0])
    for key, value in scalar.state_dict().items():
        np.testing.assert_array_equal(value, array.state_dict()[key][0])


def test_scalar_stream_accepts_numpy_scalars_and_falls_back_for_arrays() -> None:
    fast, slow = series.EWMStream(span=5), series.EWMStream(span=5)
    for x in (1.0, np.float32(2.5), np.int64(3), 4):
        fast.update(x)
        slow.update(np.asarray(x, dtype=np.float64))  # a 0-d array takes the array path
    np.testing.assert_array_equal(fast.value, slow.value)
    np.testing.assert_array_equal(fast.var, slow.var)
