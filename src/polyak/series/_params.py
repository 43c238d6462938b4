"""Parameter checks shared by the batch functions and the streams."""

from __future__ import annotations

import math
from typing import Any


def resolve_alpha(
    *, alpha: float | None, span: float | None, halflife: float | None, com: float | None, times: bool = False
) -> float:
    """The smoothing factor alpha from exactly one of pandas' four parameterisations.

    alpha = 1 / (1 + com) = 2 / (span + 1) = 1 - exp(-ln 2 / halflife), as in ``pandas.DataFrame.ewm``.
    With ``times``, ``halflife`` is in the units of the times and alpha is not used (the decay is
    0.5 ** (delta_t / halflife) per step).
    """
    given = {k: v for k, v in (("alpha", alpha), ("span", span), ("halflife", halflife), ("com", com)) if v is not None}
    if times:
        if set(given) != {"halflife"}:
            raise ValueError("with times=..., give halflife (in the units of times) and no other parameter")
        return 0.5
    if len(given) != 1:
        names = ", ".join(given) if given else "none"
        raise ValueError(f"give exactly one of alpha, span, halflife, com (got {names})")
    (name, value), *_ = given.items()
    value = _number(value, name)
    # Through the centre of mass and back, as pandas does (alpha = 1 / (1 + com)), so that 1 - alpha
    # rounds the same way: it matters at alpha near 1, where 1 - alpha has few significant bits.
    if name == "alpha":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {value}")
        com = (1.0 - value) / value
    elif name == "span":
        if value < 1.0:
            raise ValueError(f"span must be >= 1, got {value}")
        com = (value - 1.0) / 2.0
    elif name == "com":
        if value < 0.0:
            raise ValueError(f"com must be >= 0, got {value}")
        com = value
    else:
        if value <= 0.0:
            raise ValueError(f"halflife must be > 0, got {value}")
        com = 1.0 / (1.0 - math.exp(math.log(0.5) / value)) - 1.0
    return 1.0 / (1.0 + com)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1, got {type(window).__name__} {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window


def check_min_periods(min_periods: object, default: int) -> int:
    if min_periods is None:
        return default
    if isinstance(min_periods, bool) or not isinstance(min_periods, int) or min_periods < 0:
        raise ValueError(f"min_periods must be an int >= 0, got {min_periods!r}")
    return min_periods
