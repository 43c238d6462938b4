"""Small models for the experiments: MLPs, with or without BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(in_features: int, hidden: Sequence[int], out_features: int, *, batchnorm: bool = False) -> nn.Sequential:
    """``in -> hidden[0] -> ... -> out`` with ReLU (and BatchNorm1d before each ReLU when ``batchnorm``).

    The regression model of the claim is ``mlp(20, [64, 32], 1)``.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
