"""Small models and a float64 reference of the update rule, written independently of polyak."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Vec(nn.Module):
    """One parameter vector: lets a test dictate the exact weight sequence."""

    def __init__(self, n: int = 4, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=dtype))

    def set(self, value: torch.Tensor | float) -> None:
        with torch.no_grad():
            self.w.copy_(torch.as_tensor(value, dtype=self.w.dtype).expand_as(self.w))


def reference_average(
    w0: torch.Tensor,
    weights: Sequence[torch.Tensor],
    schedule: Callable[[int], float],
    *,
    start_step: int = 0,
    update_every: int = 1,
    debias: bool = False,
) -> torch.Tensor:
    """The documented rule in float64: copy before start_step; every k-th call afterwards
    s <- b s + (1 - b) w with b the product of the k per-step decays; debias divides by 1 - prod(b)."""
    s = torch.zeros_like(w0, dtype=torch.float64) if debias else w0.to(torch.float64).clone()
    prod = 1.0
    for n, w in enumerate(weights, start=1):
        w64 = w.to(torch.float64)
        t = n - start_step
        if t <= 0:
            s, prod = w64.clone(), 0.0
            continue
        if t % update_every:
            continue
        b = 1.0
        for j in range(max(1, t - update_every + 1), t + 1):
            b *= schedule(j)
        s = b * s + (1.0 - b) * w64
        prod *= b
    if debias:
        return w0.to(torch.float64) if prod == 1.0 else s / (1.0 - prod)
    return s


def run(ema_factory: Callable[[nn.Module], object], model: Vec, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    ema = ema_factory(model)
    for w in weights:
        model.set(w)
        ema.update()  # type: ignore[attr-defined]
    return ema.averaged_state_dict()["w"]  # type: ignore[attr-defined]
