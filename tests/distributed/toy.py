"""The small models and data the sharded-averaging tests share: dims of 5 and 1, so that shards are uneven
(5 rows over 2 ranks: 3 and 2) and empty (1 row over 2 ranks)."""

from __future__ import annotations

import torch
from torch import nn

import polyak

STEPS = 5
DECAYS = [0.9, 0.5]
BATCH = 12  # divisible by 2 and 3


class Net(nn.Module):
    """Four parameters of every awkward size: (5, 5) and (1, 5) weights, a 0-dim scalar and a 3-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 1)
        self.s = nn.Parameter(torch.tensor(0.5))
        self.big = nn.Parameter(torch.randn(3, 7, 2))


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of ``BATCH`` inputs (5 features) and targets (1 output), fixed seed."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 5, generator=gen), torch.randn(STEPS, BATCH, 1, generator=gen)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on the mean squared error."""
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def train_whole_batches(model: nn.Module, steps: int = STEPS) -> polyak.EMA:
    """The single-process reference: an EMA (``DECAYS``) of ``model`` trained on the whole batches by SGD."""
    ema = polyak.EMA(model, decay=DECAYS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = batches()
    for i in range(steps):
        sgd_step(model, opt, xs[i], ys[i])
        ema.update()
    return ema
