"""The device-side step of ``EMA(capturable=True)``: counters and decays as tensors, no host reads.

Every call of ``update()`` runs the same tensor ops whatever the step, so a CUDA graph can replay it and
``torch.compile`` traces it once. What the default path decides in Python is computed here with
``torch.where`` from the step tensor, with the arithmetic of the default path (``EMA.decays_at``):

* ``t = step - start_step`` (``step`` counts calls, this one included);
* a copy when ``t <= 0``: lerp weight 1, decay product reset to 0 (debias);
* an averaging step when ``t > 0`` and ``t % k == 0`` (``k = update_every``): the decay is the product
  ``beta(t-k+1) * ... * beta(t)``, multiplied left to right, and the lerp weight is ``1 - decay``;
* otherwise an off-step: lerp weight 0, which leaves the shadow unchanged (``lerp(s, w, 0) == s`` for
  finite ``w``; a non-finite ``w`` is masked out by the finiteness check unless the policy is "ignore").

The schedules are evaluated at ``max(s, 1)`` so that off-steps never compute ``1/0``; those values are
never selected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polyak.schedules import TensorSchedule


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 for decays and products, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class DeviceState:
    """The counters of a capturable EMA, as tensors on the shadow device.

    They are only ever updated in place, so a captured CUDA graph keeps pointing at them (also across
    ``load_state_dict``). ``reported`` is host-side: how many refusals the host has already acted on.
    """

    step: Tensor  # int64 (): calls of update()
    products: Tensor  # (K,): prod(beta) over every averaging update of each average (debias); 0 after a copy
    last_decays: Tensor  # (K,): the decays of the last averaging update (0 after a copy)
    refused: Tensor  # int64 (): updates refused by the finiteness check so far
    last_refused: Tensor  # int64 (): the step (1-based call number) of the latest refused update
    reported: int = 0

    @classmethod
    def create(cls, device: torch.device, num_averages: int) -> DeviceState:
        dtype = compute_dtype(device)
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            products=torch.ones(num_averages, dtype=dtype, device=device),
            last_decays=torch.zeros(num_averages, dtype=dtype, device=device),
            refused=torch.zeros((), dtype=torch.int64, device=device),
            last_refused=torch.zeros((), dtype=torch.int64, device=device),
        )

    def read(self) -> tuple[int, list[float], list[float], int, int]:
        """(step, products, last decays, refused, last refused step) on the host: one transfer, one sync."""
        k = self.products.numel()
        packed = torch.cat(
            [
                self.step.reshape(1).to(torch.float64),
                self.refused.reshape(1).to(torch.float64),
                self.last_refused.reshape(1).to(torch.float64),
                self.products.to(torch.float64),
                self.last_decays.to(torch.float64),
            ]
        ).tolist()
        return int(packed[0]), packed[3 : 3 + k], packed[3 + k :], int(packed[1]), int(packed[2])

    def load(self, step: int, products: Sequence[float], last_decays: Sequence[float]) -> None:
        """Overwrite the counters in place (a new run: no refusals pending)."""
        self.step.fill_(step)
        self.products.copy_(torch.tensor([float(p) for p in products], dtype=torch.float64))
        self.last_decays.copy_(torch.tensor([float(d) for d in last_decays], dtype=torch.float64))
        self.refused.zero_()
        self.last_refused.zero_()
        self.reported = 0


@dataclass(frozen=True)
class StepDecision:
    """What this call does, per average, as device tensors (``compute_dtype``)."""

    weights: Tensor  # (K,) lerp weights: 1 copy, 1 - decay averaging, 0 off-step
    decays: Tensor  # (K,) the product of the k per-step decays (meaningful on averaging steps)
    copy: Tensor  # bool (): t <= 0
    averaging: Tensor  # bool (): t > 0 and t % k == 0


def decide(schedules: Sequence[TensorSchedule], step: Tensor, start_step: int, update_every: int) -> StepDecision:
    """The lerp weight of each average for the call numbered ``step`` (module docstring for the rules)."""
    t = step - start_step
    copy = t <= 0
    averaging = t > 0 if update_every == 1 else (t > 0) & (torch.remainder(t, update_every) == 0)
    decays: list[Tensor] = []
    for schedule in schedules:
        product = schedule.at_tensor(torch.clamp_min(t - (update_every - 1), 1))
        for lag in range(update_every - 2, -1, -1):
            product = product * schedule.at_tensor(torch.clamp_min(t - lag, 1))
        decays.append(product)
    stacked = torch.stack(decays)
    weights = torch.where(copy, 1.0, torch.where(averaging, 1.0 - stacked, 0.0))
    return StepDecision(weights, stacked, copy, averaging)


def commit_(state: DeviceState, decision: StepDecision, ok: Tensor | None) -> None:
    """Advance the bookkeeping after the shadows were updated: the debias products and last decays move
    only on an accepted copy or averaging update; a refused one (``ok`` False) is counted instead."""
    active = decision.copy | decision.averaging
    accepted = active if ok is None else active & ok
    factor = torch.where(decision.copy, 0.0, torch.where(decision.averaging, decision.decays, 1.0))
    state.products.copy_(torch.where(accepted, state.products * factor, state.products))
    last = torch.where(decision.copy, 0.0, decision.decays)
    state.last_decays.copy_(torch.where(accepted, last, state.last_decays))
    if ok is not None:
        refused = active & ~ok
        state.refused.add_(refused.to(torch.int64))
        state.last_refused.copy_(torch.where(refused, state.step, state.last_refused))
