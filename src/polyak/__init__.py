"""polyak: weight averaging for PyTorch training.

The public API is this list; everything in a module whose name starts with ``_`` is internal.
Importing ``polyak`` imports torch and nothing heavier; ``polyak.series`` (numpy/scipy) loads on first use.
"""

from typing import Any

from polyak import schedules
from polyak.bn import update_bn
from polyak.ema import EMA, NonFinitePolicy
from polyak.io import load, save
from polyak.posthoc import PostHocEMA
from polyak.teacher import Teacher

__all__ = ["EMA", "NonFinitePolicy", "PostHocEMA", "Teacher", "load", "save", "schedules", "series", "update_bn"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "series":
        import importlib

        return importlib.import_module("polyak.series")
    raise AttributeError(f"module 'polyak' has no attribute {name!r}")
