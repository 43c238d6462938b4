"""The local-level Kalman filter, the model-based relative of the EMA.

Model: level_t = level_{t-1} + w_t, w ~ N(0, q);  x_t = level_t + v_t, v ~ N(0, r). Filter:
P <- P + q; K = P / (P + r); m <- m + K (x - m); P <- (1 - K) P. Its gain converges to
K* = P* / (P* + r) with P* = (q + sqrt(q^2 + 4 q r)) / 2, and the steady-state filter *is* an EMA with
alpha = K* (adjust=False). So: an EMA is the right smoother when the noise levels are constant and you
only need one knob; the Kalman filter earns its keep when the noise varies over time (pass arrays), when
values are missing (it widens P over gaps), or when you want the uncertainty P alongside the estimate.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from polyak._validate import as_float
from polyak.series._params import missing_inf
from polyak.series.batch import _apply

__all__ = ["KalmanResult", "kalman_local_level", "steady_state_gain"]


class KalmanResult(NamedTuple):
    mean: Any  # filtered level, same type and shape as x
    var: Any  # its variance P
    gain: Any  # the Kalman gain K used at each step (0 where x was missing)


def steady_state_gain(process_var: float, obs_var: float) -> float:
    """K* = P*/(P* + r), P* = (q + sqrt(q^2 + 4qr)) / 2: the EMA alpha the filter converges to."""
    q, r = float(process_var), float(obs_var)
    p = (q + math.sqrt(q * q + 4.0 * q * r)) / 2.0
    return p / (p + r)


def kalman_local_level(
    x: Any,
    *,
    process_var: float,
    obs_var: float,
    initial_mean: float | None = None,
    initial_var: float | None = None,
    axis: int = -1,
) -> KalmanResult:
    """Filter ``x`` with the local-level model (see module docstring). NaN and +-inf are missing
    observations: the level is predicted and P grows. Starts at the first observation with P = ``obs_var`` unless
    ``initial_mean``/``initial_var`` are given."""
    q, r = as_float(process_var, "process_var"), as_float(obs_var, "obs_var")
    for name, value in (("process_var", q), ("obs_var", r)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    parts: dict[str, NDArray[np.float64]] = {}

    def run(flat: NDArray[np.float64]) -> NDArray[np.float64]:
        flat = missing_inf(flat)
        n_series, n = flat.shape
        m = np.full(n_series, np.nan if initial_mean is None else float(initial_mean))
        p = np.full(n_series, r if initial_var is None else float(initial_var))
        means = np.empty_like(flat)
        variances = np.empty_like(flat)
        gains = np.zeros_like(flat)
        for t in range(n):
            obs = flat[:, t]
            seen = ~np.isnan(obs)
            started = ~np.isnan(m)
            first = seen & ~started
            m = np.where(first, obs, m)
            predicted = np.where(started, p + q, p)
            k = np.where(seen & started, predicted / (predicted + r), 0.0)
            m = np.where(seen & started, m + k * (obs - m), m)
            p = np.where(seen & started, (1.0 - k) * predicted, predicted)
            means[:, t], variances[:, t], gains[:, t] = m, p, k
        parts["var"], parts["gain"] = variances, gains
        return means

    mean = _apply(x, axis, run)
    var = _apply(x, axis, lambda _flat: parts["var"])
    gain = _apply(x, axis, lambda _flat: parts["gain"])
    return KalmanResult(mean, var, gain)
