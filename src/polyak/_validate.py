"""Argument checks shared by every public entry point: one place that says what a valid int or float is.

Python ints and floats are accepted, and so are numpy scalars (``np.int64(3)``, ``np.float32(0.5)``) and
anything else that implements ``__index__`` / ``__float__``; ``bool`` is refused (``True`` is not a count),
and so is a tensor (reading one would synchronise a device). Each check returns the plain Python value so
callers never carry a numpy scalar further. Errors name the argument and say what was expected.
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = ["as_bool", "as_float", "as_int"]


def _is_bool(value: object) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _is_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch")


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; ``TypeError`` for a non-integer, ``ValueError``
    for one out of range."""
    if _is_bool(value) or _is_tensor(value) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {result}")
    return result


def as_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    finite: bool = True,
) -> float:
    """``value`` as a Python float in the closed range ``[minimum, maximum]`` (finite unless ``finite=False``);
    ``TypeError`` for a non-number, ``ValueError`` for NaN, inf or a value out of range."""
    if _is_bool(value) or _is_tensor(value) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}") from None
    if math.isnan(result) or (finite and math.isinf(result)):
        raise ValueError(f"{name} must be finite, got {result}")
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {result}")
    return result


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a Python bool; ``TypeError`` for anything that is not ``True``/``False``."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)
