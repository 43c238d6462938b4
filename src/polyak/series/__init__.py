"""Moving averages for series and metrics: batch (NumPy/torch arrays) and streaming (O(1) state).

Needs the ``[series]`` extra (numpy, scipy; pandas for the CLI's CSV reading is optional). The names load
on first use, so ``polyak smooth --help`` (``polyak.series.cli``) works before the extra is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polyak.series.batch import debiased, ema, ewm_std, ewm_var, sma, wma
    from polyak.series.kalman import kalman_local_level
    from polyak.series.streaming import DebiasedStream, EWMStream, SMAStream, WMAStream
    from polyak.series.threshold import AnomalyStream, ema_bands

_HOMES: dict[str, str] = {
    "debiased": "batch",
    "ema": "batch",
    "ewm_std": "batch",
    "ewm_var": "batch",
    "sma": "batch",
    "wma": "batch",
    "kalman_local_level": "kalman",
    "DebiasedStream": "streaming",
    "EWMStream": "streaming",
    "SMAStream": "streaming",
    "WMAStream": "streaming",
    "AnomalyStream": "threshold",
    "ema_bands": "threshold",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'polyak.series' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"polyak.series.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
