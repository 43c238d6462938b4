"""The teacher momentum schedules against the reference recipes, re-implemented here from each paper's
published code (numpy where the reference uses numpy), and their tensor forms against the float forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import schedules


def dino_reference(base: float, final: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """facebookresearch/dino utils.cosine_scheduler without warm-up (the teacher momentum call)."""
    iters = np.arange(epochs * niter_per_ep)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


class DinoV2Reference:
    """facebookresearch/dinov2 train.CosineScheduler (no warm-up, no freeze: the momentum call)."""

    def __init__(self, base_value: float, final_value: float, total_iters: int) -> None:
        self.final_value = final_value
        self.total_iters = total_iters
        iters = np.arange(total_iters)
        self.schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))

    def __getitem__(self, it: int) -> float:
        return self.final_value if it >= self.total_iters else float(self.schedule[it])


def lightly_reference(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """lightly.models.utils.cosine_schedule (period=None)."""
    if max_steps == 1 or step >= max_steps:
        return end_value
    return float(end_value - (end_value - start_value) * (np.cos(np.pi * step / (max_steps - 1)) + 1) / 2)


def moco_reference(epoch: float, epochs: int, moco_m: float) -> float:
    """facebookresearch/moco-v3 main_moco.adjust_moco_momentum."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


def ijepa_reference(ipe: int, num_epochs: int, ema: tuple[float, float], ipe_scale: float) -> list[float]:
    """facebookresearch/ijepa train.py momentum_scheduler (a generator), materialised."""
    gen = (
        ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)
        for i in range(int(ipe * num_epochs * ipe_scale) + 1)
    )
    return list(gen)


def test_dino_matches_reference_and_never_reaches_one() -> None:
    ref = dino_reference(0.996, 1.0, epochs=7, niter_per_ep=13)
    s = schedules.dino(7 * 13, base=0.996)
    ours = [s(t) for t in range(1, 7 * 13 + 1)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
    assert ours[0] == 0.996
    assert max(ours) < 1.0
    assert s(10_000) == ours[-1]  # held after the run


def test_dinov2_matches_reference_and_reaches_one() -> None:
    ref = DinoV2Reference(0.992, 1.0, 50)
    s = schedules.dinov2(50)
    for it in range(80):
        assert s(it + 1) == pytest.approx(ref[it], abs=1e-15)
    assert s(51) == 1.0
    assert s(50) < 1.0


@pytest.mark.parametrize("max_steps", [1, 2, 10, 37])
@pytest.mark.parametrize("per_epoch", [1, 5])
def test_lightly_cosine_matches_reference(max_steps: int, per_epoch: int) -> None:
    s = schedules.lightly_cosine(max_steps, start=0.996, end=1.0, steps_per_epoch=per_epoch)
    for t in range(1, (max_steps + 3) * per_epoch):
        step = (t - 1) // per_epoch
        assert s(t) == pytest.approx(lightly_reference(step, max_steps, 0.996, 1.0), abs=1e-15)
    assert s(max_steps * per_epoch) == 1.0 or max_steps == 1  # reached inside the run (step = max_steps - 1)


def test_moco_v3_fractional_epochs_match_reference() -> None:
    epochs, ipe = 5, 7
    s = schedules.moco_v3(epochs, ipe, base=0.99)
    t = 0
    for epoch in range(epochs):
        for i in range(ipe):
            t += 1
            assert s(t) == moco_reference(epoch + i / ipe, epochs, 0.99)  # same operations: bitwise
    assert s(t + 1) == 1.0


@pytest.mark.parametrize("ipe_scale", [1.0, 1.25])
def test_ijepa_ramp_matches_reference(ipe_scale: float) -> None:
    ref = ijepa_reference(6, 4, (0.996, 1.0), ipe_scale)
    s = schedules.ijepa(6, 4, ipe_scale=ipe_scale)
    ours = [s(t) for t in range(1, len(ref) + 1)]
    assert ours == ref  # bitwise: the same expression
    assert s(len(ref) + 10) == ref[-1]
    assert ref[-1] == 1.0
    assert (s(6 * 4 + 1) == 1.0) if ipe_scale == 1.0 else (s(6 * 4) < 1.0)  # the run ends short of 1.0


def test_mean_teacher_ramp() -> None:
    s = schedules.mean_teacher(0.99)
    alpha = 0.99
    for global_step in range(1, 300):
        assert s(global_step) == min(1 - 1 / (global_step + 1), alpha)
    assert s(1) == 0.5


ALL = [
    schedules.dino(40),
    schedules.dinov2(40, base=0.9),
    schedules.lightly_cosine(40, steps_per_epoch=3),
    schedules.lightly_cosine(1),
    schedules.moco_v3(4, 9),
    schedules.ijepa(5, 6, ipe_scale=1.25),
    schedules.mean_teacher(0.999),
]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_tensor_form_matches_float_form(schedule: schedules.TensorSchedule) -> None:
    ts = torch.arange(1, 400)
    got = schedule.at_tensor(ts)
    assert got.dtype == torch.float64
    assert got.shape == ts.shape
    want = torch.tensor([schedule(int(t)) for t in ts], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert isinstance(schedule, schedules.TensorSchedule)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    base=st.floats(0.0, 1.0),
    t=st.integers(1, 20000),
)
def test_every_teacher_schedule_stays_in_unit_interval(n: int, base: float, t: int) -> None:
    for s in (
        schedules.dino(n, base=base),
        schedules.dinov2(n, base=base),
        schedules.lightly_cosine(n, start=base),
        schedules.moco_v3(n, 3, base=base),
        schedules.ijepa(3, n, start=base),
        schedules.mean_teacher(base),
    ):
        assert 0.0 <= s(t) <= 1.0


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda: schedules.dino(0), ValueError),
        (lambda: schedules.dino(10, base=1.5), ValueError),
        (lambda: schedules.moco_v3(2.5, 3), TypeError),
        (lambda: schedules.ijepa(3, 3, ipe_scale=0.0), ValueError),
        (lambda: schedules.lightly_cosine(True), TypeError),
        (lambda: schedules.mean_teacher(-0.1), ValueError),
    ],
)
def test_bad_parameters_raise(factory: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        factory()  # type: ignore[operator]
