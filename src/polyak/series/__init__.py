"""Moving averages for series and metrics: batch (NumPy/torch arrays) and streaming (O(1) state).

Needs the ``[series]`` extra (numpy, scipy; pandas for the CLI's CSV reading is optional).
"""

from polyak.series.batch import debiased, ema, ewm_std, ewm_var, sma, wma
from polyak.series.kalman import kalman_local_level
from polyak.series.streaming import DebiasedStream, EWMStream, SMAStream, WMAStream
from polyak.series.threshold import AnomalyStream, ema_bands

__all__ = [
    "AnomalyStream",
    "DebiasedStream",
    "EWMStream",
    "SMAStream",
    "WMAStream",
    "debiased",
    "ema",
    "ema_bands",
    "ewm_std",
    "ewm_var",
    "kalman_local_level",
    "sma",
    "wma",
]
