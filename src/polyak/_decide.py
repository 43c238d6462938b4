"""What one call of ``EMA.update()`` does: a pure function of the call number, in float and tensor forms.

For the call numbered ``step`` (1-based, this call included) and ``t = step - start_step``:

* ``t <= 0``: a **copy** (every shadow takes the weights; lerp weight 1; a decay of 0 for debias);
* ``t > 0`` and ``t % k == 0`` (``k = update_every``): an **averaging** update with, per average, the
  decay ``beta(t-k+1) * ... * beta(t)`` (multiplied left to right) and the lerp weight ``1 - decay``;
* otherwise an **off-step**: nothing changes (lerp weight 0).

The float form (``decide``) runs on the host; the tensor form (``decide_tensor``) computes the same
numbers with torch ops from a step tensor, with no host read and no Python branch on the step, so a
CUDA graph or ``torch.compile`` can hold it (``EMA(capturable=True)``). Both multiply the per-step decays
in the same order, so they give the same bits (``ultralytics``: see ``polyak.schedules`` on ``exp``).

A product over more than ``LOOP_LIMIT`` steps (a very large ``update_every``) is computed in closed form
where the schedule has one (``decay_product``), so ``update_every=10**7`` costs O(1) per averaging update
instead of ten million schedule calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polyak import schedules as sch
from polyak.schedules import TensorSchedule

__all__ = [
    "Decision",
    "TensorDecision",
    "check_tensor_forms",
    "checked_decay",
    "decay_product",
    "decide",
    "decide_tensor",
    "tensor_schedules",
]

# Up to this many steps the product of per-step decays is multiplied step by step (the reference
# arithmetic, bit for bit what the schedule gives); above it a closed form or a bounded computation.
LOOP_LIMIT = 64
# Steps evaluated per chunk when a product has no closed form (ultralytics, inverse_gamma, float64).
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Decision:
    """What this call does (float form): a copy, an averaging update, or neither (an off-step)."""

    copy: bool
    averaging: bool
    decays: tuple[float, ...]  # per average: the product of the k per-step decays; 0.0 for a copy

    @property
    def active(self) -> bool:
        """True when the shadows change (a copy or an averaging update)."""
        return self.copy or self.averaging

    @property
    def weights(self) -> tuple[float, ...]:
        """Lerp weight per average: 1 for a copy, ``1 - decay`` when averaging, 0 on an off-step."""
        if self.copy:
            return tuple(1.0 for _ in self.decays)
        if self.averaging:
            return tuple(1.0 - d for d in self.decays)
        return tuple(0.0 for _ in self.decays)


@dataclass(frozen=True)
class TensorDecision:
    """What this call does (tensor form), as device tensors of ``compute_dtype``."""

    weights: Tensor  # (K,) lerp weights: 1 copy, 1 - decay averaging, 0 off-step
    decays: Tensor  # (K,) the product of the k per-step decays (meaningful on averaging steps)
    copy: Tensor  # bool (): t <= 0
    averaging: Tensor  # bool (): t > 0 and t % k == 0


def checked_decay(schedule: Callable[[int], float], t: int, index: int) -> float:
    """``schedule(t)`` as a Python float in [0, 1]; a clear error for anything else."""
    value = schedule(t)
    if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"schedule {schedule!r} (decay index {index}) returned {type(value).__name__} at t={t}; "
            "a schedule must return a Python float (no tensors: reading one would sync the device)"
        )
    if not (0.0 <= value <= 1.0):
        raise ValueError(
            f"schedule {schedule!r} (decay index {index}) returned {value!r} at t={t}; decays must be in [0, 1]"
        )
    return float(value)


def decay_product(schedule: Callable[[int], float], lo: int, hi: int, index: int = 0) -> float:
    """``beta(lo) * beta(lo + 1) * ... * beta(hi)`` (1.0 when ``hi < lo``).

    Multiplied step by step (left to right) for up to ``LOOP_LIMIT`` steps. Longer products use the
    schedule's closed form: ``d ** n`` (constant, half_life), ``(lo - 1) / hi`` (uniform: the product
    telescopes, ``prod (s - 1) / s``), its power ``gamma + 1`` (power_function), the telescoping ratio of
    ``num_updates``; ultralytics and inverse_gamma reach their limit decay exactly after a known step
    (then ``d ** n``) and are summed in float64 logs in chunks before it; a plain callable is called for
    every step. Closed forms agree with the loop to a few ulps (both are exact up to rounding).
    """
    if hi < lo:
        return 1.0
    if hi - lo + 1 <= LOOP_LIMIT:
        value = 1.0
        for s in range(lo, hi + 1):
            value *= checked_decay(schedule, s, index)
        return value
    checked_decay(schedule, lo, index)
    checked_decay(schedule, hi, index)
    n = hi - lo + 1
    if isinstance(schedule, sch.constant):
        return schedule.decay**n
    if isinstance(schedule, sch.half_life):
        return schedule(1) ** n
    if isinstance(schedule, sch.uniform):
        return (lo - 1) / hi
    if isinstance(schedule, sch.power_function):
        return float(((lo - 1) / hi) ** (schedule.gamma + 1.0))
    if isinstance(schedule, sch.num_updates):
        return _num_updates_product(schedule.decay, lo, hi)
    if isinstance(schedule, sch.ultralytics):
        # 1 - exp(-t/tau) rounds to 1.0 once exp(-t/tau) < 2**-54: beta is then exactly `decay`.
        return _saturating_product(schedule, lo, hi, math.ceil(schedule.tau * 54 * math.log(2)) + 1, schedule.decay)
    if isinstance(schedule, sch.inverse_gamma):
        try:  # beta_t reaches max_decay (then clamped, exactly) at t = inv_gamma ((1 - max)^(-1/power) - 1)
            sat = schedule.inv_gamma * ((1.0 - schedule.max_decay) ** (-1.0 / schedule.power) - 1.0)
            saturation = max(1, math.ceil(sat) + 1)
        except (ZeroDivisionError, OverflowError):  # max_decay 1.0, or a step beyond any float
            saturation = hi + 1
        return _saturating_product(schedule, lo, hi, saturation, schedule.max_decay)
    value = 1.0
    for s in range(lo, hi + 1):
        value *= checked_decay(schedule, s, index)
    return value


def _num_updates_product(decay: float, lo: int, hi: int) -> float:
    """prod over [lo, hi] of min(decay, (1 + t) / (10 + t)): the ratio grows with t, so it is below
    ``decay`` up to some step m and capped after it; ``prod_{lo..m} (1+t)/(10+t)`` telescopes to
    ``prod_{j=0..8} (lo + 1 + j) / (m + 2 + j)`` when the range holds at least 9 steps."""
    # (1 + t) / (10 + t) < decay  <=>  t < (10 d - 1) / (1 - d)
    m = hi if decay >= 1.0 else min(hi, max(lo - 1, math.ceil((10.0 * decay - 1.0) / (1.0 - decay)) + 1))
    while m >= lo and (1.0 + m) / (10.0 + m) >= decay:  # exact boundary, floats as the schedule computes
        m -= 1
    while m < hi and (1.0 + m + 1) / (10.0 + m + 1) < decay:
        m += 1
    ratio = 1.0
    if m - lo + 1 >= 9:
        for j in range(9):
            ratio *= (lo + 1 + j) / (m + 2 + j)
    else:
        for t in range(lo, m + 1):
            ratio *= (1.0 + t) / (10.0 + t)
    return ratio * decay ** (hi - max(m, lo - 1))


def _saturating_product(schedule: TensorSchedule, lo: int, hi: int, saturation: int, limit: float) -> float:
    """Product of a schedule that equals ``limit`` exactly from step ``saturation`` on: the steps before
    it in float64 logs (chunks of the tensor form), the rest as ``limit ** n``."""
    head_hi = min(hi, saturation - 1)
    log_sum = 0.0
    for start in range(lo, head_hi + 1, _CHUNK):
        steps = torch.arange(start, min(head_hi, start + _CHUNK - 1) + 1, dtype=torch.int64)
        betas = schedule.at_tensor(steps).to(torch.float64)
        if bool((betas <= 0.0).any()):
            return 0.0
        log_sum += float(torch.log(betas).sum())
    tail = hi - max(lo, saturation) + 1
    return math.exp(log_sum) * (limit**tail if tail > 0 else 1.0)


def decide(schedules: Sequence[Callable[[int], float]], step: int, start_step: int, update_every: int) -> Decision:
    """The float form: what the call numbered ``step`` does (module docstring for the rules)."""
    t = step - start_step
    if t <= 0:
        return Decision(copy=True, averaging=False, decays=tuple(0.0 for _ in schedules))
    if t % update_every:
        return Decision(copy=False, averaging=False, decays=tuple(0.0 for _ in schedules))
    lo = max(1, t - update_every + 1)
    return Decision(
        copy=False, averaging=True, decays=tuple(decay_product(s, lo, t, i) for i, s in enumerate(schedules))
    )


def product_tensor(schedule: TensorSchedule, t: Tensor, update_every: int) -> Tensor:
    """The tensor form of ``decay_product(schedule, max(1, t - k + 1), t)`` for ``k = update_every``:
    multiplied step by step, left to right, for ``k <= LOOP_LIMIT``; the closed form of constant,
    half_life, uniform and power_function above it (others: ``tensor_product_supported`` is False)."""
    if update_every <= LOOP_LIMIT:
        product = schedule.at_tensor(torch.clamp_min(t - (update_every - 1), 1))
        for lag in range(update_every - 2, -1, -1):
            product = product * schedule.at_tensor(torch.clamp_min(t - lag, 1))
        return product
    tt = torch.clamp_min(t, 1)
    lo = torch.clamp_min(t - (update_every - 1), 1)
    n = (tt - lo + 1).to(torch.float64 if t.device.type != "mps" else torch.float32)
    if isinstance(schedule, (sch.constant, sch.half_life)):
        return torch.pow(schedule.at_tensor(tt), n)
    fl = n.dtype
    ratio = torch.div((lo - 1).to(fl), tt.to(fl))
    if isinstance(schedule, sch.uniform):
        return ratio
    if isinstance(schedule, sch.power_function):
        return torch.pow(ratio, torch.full_like(ratio, schedule.gamma + 1.0))
    raise TypeError(f"schedule {schedule!r} has no closed-form product for update_every={update_every}")


def tensor_product_supported(schedule: TensorSchedule, update_every: int) -> bool:
    """Whether ``product_tensor`` can compute this schedule's product over ``update_every`` steps."""
    return update_every <= LOOP_LIMIT or isinstance(
        schedule, (sch.constant, sch.half_life, sch.uniform, sch.power_function)
    )


def decide_tensor(
    schedules: Sequence[TensorSchedule], step: Tensor, start_step: int, update_every: int
) -> TensorDecision:
    """The tensor form of ``decide`` (same rules, same arithmetic). Schedules are evaluated at
    ``max(s, 1)`` so off-steps never compute ``1/0``; those values are never selected."""
    t = step - start_step
    copy = t <= 0
    averaging = t > 0 if update_every == 1 else (t > 0) & (torch.remainder(t, update_every) == 0)
    stacked = torch.stack([product_tensor(s, t, update_every) for s in schedules])
    weights = torch.where(copy, 1.0, torch.where(averaging, 1.0 - stacked, 0.0))
    return TensorDecision(weights, stacked, copy, averaging)


def tensor_schedules(schedules: Sequence[Callable[[int], float]], update_every: int) -> tuple[TensorSchedule, ...]:
    """The schedules of ``EMA(capturable=True)``, typed: each needs a tensor form (``at_tensor``) and a
    product over ``update_every`` steps that the device can compute (``tensor_product_supported``)."""
    out: list[TensorSchedule] = []
    for i, schedule in enumerate(schedules):
        if not isinstance(schedule, TensorSchedule):
            raise TypeError(
                f"EMA(capturable=True) computes each decay on the device, but schedule {schedule!r} "
                f"(decay index {i}) has no tensor form. Use a float or a schedule from polyak.schedules, "
                "give your schedule an `at_tensor(t: Tensor) -> Tensor` method computing the same "
                "formula with torch ops (see polyak.schedules.TensorSchedule), or pass capturable=False"
            )
        if not tensor_product_supported(schedule, update_every):
            raise ValueError(
                f"EMA(capturable=True, update_every={update_every}): schedule {schedule!r} (decay index "
                f"{i}) has no closed-form product over {update_every} steps on the device; use "
                f"update_every <= {LOOP_LIMIT}, a constant/half_life/uniform/power_function schedule, or "
                "capturable=False"
            )
        out.append(schedule)
    return tuple(out)


def check_tensor_forms(schedules: Sequence[TensorSchedule], device: torch.device) -> None:
    """Once, at construction: each tensor form returns a floating 0-dim tensor equal to ``schedule(t)``."""
    for i, schedule in enumerate(schedules):
        for t in (1, 2, 1000):
            value = schedule.at_tensor(torch.full((), t, dtype=torch.int64, device=device))
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.shape != ():
                raise TypeError(
                    f"schedule {schedule!r} (decay index {i}): at_tensor(t) must return a floating tensor "
                    f"shaped like t (here 0-dim), got {value!r}"
                )
            expected = checked_decay(schedule, t, i)
            if abs(float(value) - expected) > 1e-6:
                raise ValueError(
                    f"schedule {schedule!r} (decay index {i}): at_tensor({t}) = {float(value)!r} but "
                    f"schedule({t}) = {expected!r}; the tensor form must compute the same formula"
                )
