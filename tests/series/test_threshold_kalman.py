"""Anomaly bands and the local-level Kalman filter against closed forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from polyak import series
from polyak.series.kalman import steady_state_gain


def test_bands_use_only_the_past_and_flag_a_spike():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    x[150] = 12.0
    bands = series.ema_bands(x, span=20, k=4.0)
    assert bands.anomaly[150]
    assert bands.anomaly.sum() == 1
    past = pd.Series(x).ewm(span=20, ignore_na=True)
    np.testing.assert_allclose(bands.mean[1:], past.mean().to_numpy()[:-1], rtol=1e-12)
    np.testing.assert_allclose(bands.upper[2:], (past.mean() + 4.0 * past.std()).to_numpy()[1:-1], rtol=1e-12)


def test_anomaly_stream_warmup_and_nan():
    stream = series.AnomalyStream(2, alpha=0.2, k=2.0, warmup=3)
    for v in ([0.0, 0.0], [1.0, 1.0], [0.0, float("nan")]):
        assert not stream.update(v).any()
    assert stream.update([100.0, 100.0]).tolist() == [True, False]  # stream 2 has seen only 2 values
    with pytest.raises(ValueError, match="k must be a positive"):
        series.AnomalyStream(k=0)


def test_kalman_gain_converges_to_the_closed_form_and_equals_an_ema():
    q, r = 0.05, 1.0
    x = np.random.default_rng(1).normal(size=400).cumsum()
    result = series.kalman_local_level(x, process_var=q, obs_var=r)
    k_star = steady_state_gain(q, r)
    assert result.gain[-1] == pytest.approx(k_star, rel=1e-12)
    assert k_star**2 / (1 - k_star) == pytest.approx(q / r, rel=1e-12)  # q/r = K^2 / (1 - K)
    # Started at its steady state, the filter is exactly the EMA recursion with alpha = K*.
    p_star = r * k_star / (1 - k_star) - q
    steady = series.kalman_local_level(x, process_var=q, obs_var=r, initial_mean=x[0], initial_var=p_star)
    np.testing.assert_allclose(steady.mean, series.ema(x, alpha=k_star, adjust=False), rtol=1e-10, atol=1e-12)


def test_kalman_missing_values_widen_the_variance():
    x = np.array([1.0, 2.0, np.nan, np.nan, 3.0])
    result = series.kalman_local_level(x, process_var=0.1, obs_var=1.0)
    assert result.mean[2] == result.mean[1]
    assert result.var[3] == pytest.approx(result.var[1] + 0.2)
    with pytest.raises(ValueError, match="obs_var must be a positive"):
        series.kalman_local_level(x, process_var=0.1, obs_var=0)
