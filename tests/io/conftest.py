"""Shared small models for the checkpoint tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def make_model(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 2))


@pytest.fixture
def model() -> nn.Module:
    return make_model()
