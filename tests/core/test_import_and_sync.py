"""No heavy work at import; no host synchronisation inside update()."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from polyak import EMA, schedules

HEAVY = ("pandas", "matplotlib", "sklearn", "scipy", "lightning", "transformers", "rich", "mnist1d")


def test_import_polyak_pulls_in_nothing_heavy():
    code = f"import sys, polyak; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kwargs", [{}, {"update_every": 2, "debias": True}, {"start_step": 2}])
def test_update_never_reads_a_tensor_back(monkeypatch, kwargs):
    """With nonfinite="ignore" an update is pure device work: no .item(), bool(), float() or .tolist()."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=[schedules.ultralytics(0.999, tau=5), 0.9], nonfinite="ignore", **kwargs)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside update()")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(5):
        ema.update()
    monkeypatch.undo()
    assert ema.step == 5
