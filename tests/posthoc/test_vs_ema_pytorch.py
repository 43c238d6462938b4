"""The same random walk through ema-pytorch's PostHocEMA and ours, both against the exact EMA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.peers


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "posthoc_accuracy.py"
    spec = importlib.util.spec_from_file_location("_posthoc_accuracy", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ema_pytorch_is_far_from_the_exact_ema_and_we_are_not() -> None:
    pytest.importorskip("ema_pytorch")
    bench = _bench()
    results = bench.compare(steps=2000, every=200, size=20)
    ours, theirs, theirs_k1 = (
        results["polyak PostHocEMA"],
        results["ema-pytorch, defaults"],
        results["ema-pytorch, update_every=1"],
    )
    for sigma in bench.WIDTHS:
        assert ours[sigma][0] < theirs_k1[sigma][0] < theirs[sigma][0]
        assert abs(ours[sigma][1]) < 1e-12  # no weight on step 1
    assert ours[0.05][0] < 1e-6  # stored widths come back as stored (float32 rounding only)
    assert ours[0.10][0] < 1e-6
    assert theirs[0.10][1] > 0.7  # update_every=100 with one step's beta: most weight on step 1
