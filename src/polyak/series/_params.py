"""Parameter checks shared by the batch functions and the streams."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from polyak._validate import as_float, as_int


def resolve_alpha(
    *, alpha: float | None, span: float | None, halflife: float | None, com: float | None, times: bool = False
) -> float:
    """The smoothing factor alpha from exactly one of pandas' four parameterisations.

    alpha = 1 / (1 + com) = 2 / (span + 1) = 1 - exp(-ln 2 / halflife), as in ``pandas.DataFrame.ewm``.
    With ``times``, ``halflife`` is in the units of the times and alpha is not used (the decay is
    0.5 ** (delta_t / halflife) per step). Numpy scalars are accepted. A parameter so large that
    1 - alpha rounds to 1 (span, com or halflife >= ~1e16, or a tiny alpha) gives alpha = 0 or a
    value with 1 - alpha == 1: equal weights, i.e. pandas' expanding mean.
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
    if isinstance(value, str):
        raise TypeError(f"{name} must be a number, got str {value!r}; a timedelta halflife needs times=...")
    value = as_float(value, name)
    # Through the centre of mass and back, as pandas does (alpha = 1 / (1 + com)), so that 1 - alpha
    # rounds the same way: it matters at alpha near 1, where 1 - alpha has few significant bits.
    if name == "alpha":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {value}")
        com = (1.0 - value) / value  # inf for a subnormal alpha: alpha becomes 0, equal weights
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
        decayed = 1.0 - math.exp(math.log(0.5) / value)
        com = 1.0 / decayed - 1.0 if decayed > 0.0 else math.inf  # halflife >= ~1e16: equal weights
    return 1.0 / (1.0 + com)


def check_window(window: object) -> int:
    """A window length: an int >= 1 (numpy integers accepted)."""
    return as_int(window, "window", minimum=1)


def check_min_periods(min_periods: object, default: int) -> int:
    """``min_periods``: an int >= 0 (numpy integers accepted), ``default`` when None."""
    if min_periods is None:
        return default
    return as_int(min_periods, "min_periods", minimum=0)


def missing_inf(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``x`` with +-inf replaced by NaN: pandas' window functions treat infinities as missing values
    (``pandas.core.window.rolling.BaseWindow._prep_values``). Returns ``x`` itself when it has none."""
    inf = np.isinf(x)
    return np.where(inf, np.nan, x) if inf.any() else x


def as_scalar(value: Any) -> float:
    """One observation as a float, +-inf as NaN (see ``missing_inf``)."""
    number = float(value)
    return number if math.isfinite(number) else math.nan
