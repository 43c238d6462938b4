"""Streams give the batch numbers value by value, for many streams at once, and round-trip their state."""

from __future__ import annotations

import numpy as np
import pytest

from polyak import series


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 80))
    x[rng.random(x.shape) < 0.1] = np.nan
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
    clean = np.nan_to_num(data)
    sma, wma, deb = (
        series.SMAStream(4, window=5),
        series.WMAStream(4, window=5),
        series.DebiasedStream(4, smoothing=0.8),
    )
    out = [(sma.update(data[:, t]), wma.update(clean[:, t]), deb.update(data[:, t])) for t in range(data.shape[1])]
    np.testing.assert_allclose(np.stack([o[0] for o in out], 1), series.sma(data, 5), rtol=1e-12, atol=1e-12)
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
