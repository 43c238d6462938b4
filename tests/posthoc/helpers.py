"""Drive a small model through a given weight sequence and compute exact power-function EMAs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polyak.posthoc import profile


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def random_walk(steps: int, size: int = 15, seed: int = 0, scale: float = 0.1) -> Tensor:
    """``(steps, size)`` float64 weights, theta_t = theta_{t-1} + N(0, scale^2), rounded to float32."""
    gen = torch.Generator().manual_seed(seed)
    walk = torch.cumsum(torch.randn(steps, size, generator=gen, dtype=torch.float64) * scale, 0)
    return walk.to(torch.float32).to(torch.float64)


def set_weights(net: nn.Module, flat: Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat.to(torch.float32), list(net.parameters()))


def flat(state: dict[str, Tensor], net: nn.Module) -> Tensor:
    """The averaged tensors of ``state`` in ``net.parameters()`` order, float64."""
    return torch.cat([state[name].reshape(-1).to(torch.float64) for name, _ in net.named_parameters()])


def exact(walk: Tensor, t: int, gamma: float, update_every: int = 1) -> Tensor:
    """The power-function EMA at step t, float64: sum_j w_j(n, gamma) theta_{jk}, n = t / k."""
    n = t // update_every
    thetas = walk[update_every - 1 : n * update_every : update_every]
    return profile(n, gamma) @ thetas
