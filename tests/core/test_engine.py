"""The one update engine: the deferred (device-counter) check, decays of exactly 0 and 1, very large
``update_every``, and models that cannot be averaged as they are."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from polyak import EMA, schedules
from polyak._decide import LOOP_LIMIT, decay_product

from .helpers import Vec


def _force_device_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CUDA code path (flag and counters on the device, read later) on CPU."""
    monkeypatch.setattr(EMA, "_check_on_device", lambda self: True)


def _poisoned_first_update(ema_kwargs: dict[str, object]) -> EMA:
    model = Vec(3)
    model.set(torch.tensor([1.0, 2.0, 3.0]))
    ema = EMA(model, nonfinite="skip", **ema_kwargs)  # type: ignore[arg-type]
    model.set(torch.tensor([1.0, float("nan"), 3.0]))
    ema.update()  # refused
    model.set(torch.tensor([4.0, 5.0, 6.0]))
    ema.synchronize()
    return ema


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": schedules.uniform(), "debias": True},  # decay 0 at t=1
        {"decay": [0.9, schedules.uniform()], "debias": True},
        {"decay": 0.9, "debias": True, "start_step": 1},  # a refused copy step
        {"decay": [0.0, 0.5], "debias": False},
    ],
)
def test_deferred_check_refusing_the_first_update_matches_the_host_path(
    kwargs: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue bug 1: the deferred path used to multiply the products by the refused decay and 'undo' it
    later by dividing, which cannot undo a decay of 0: products [0.0], an all-zero debiased average and
    last_decays left at the refused decay."""
    host = _poisoned_first_update(kwargs)
    _force_device_counters(monkeypatch)
    deferred = _poisoned_first_update(kwargs)
    assert deferred._device is not None
    assert host._device is None
    assert deferred._products == host._products
    assert host._products == [1.0] * host.num_averages
    assert deferred.last_decays == host.last_decays == (0.0,) * host.num_averages
    assert deferred.skipped_updates == host.skipped_updates == 1
    assert deferred.step == host.step == 1
    for k in range(host.num_averages):
        a, b = host.averaged_state_dict(index=k)["w"], deferred.averaged_state_dict(index=k)["w"]
        assert torch.equal(a, b)
        if host.debias:
            assert torch.equal(a, torch.tensor([4.0, 5.0, 6.0]))  # no update yet: the live weights


@pytest.mark.parametrize(
    "make_decay",
    [
        lambda: 1.0,
        lambda: schedules.constant(1.0),
        lambda: schedules.ultralytics(1.0, tau=2.0),  # exactly 1.0 from t = 75 on
        lambda: [0.5, 1.0],
        lambda: lambda t: min(1.0, 0.9 + 0.05 * t),  # a teacher-momentum schedule that ends at 1.0 (DINO)
    ],
    ids=["float", "constant", "ultralytics", "list", "callable"],
)
def test_a_decay_of_one_is_accepted_and_freezes_the_average(make_decay: Callable[[], object]) -> None:
    """Issue bug 5: beta in [0, 1]; beta = 1 leaves the average where it is."""
    model = Vec(2)
    model.set(1.0)
    ema = EMA(model, decay=make_decay(), start_step=1)  # type: ignore[arg-type]
    ema.update()  # copy: 1.0
    for t in range(1, 200):
        model.set(float(t))
        ema.update()
    frozen = ema.averaged_state_dict(index=-1)["w"].clone()
    for _ in range(3):
        model.set(1e6)
        ema.update()
    assert torch.equal(ema.averaged_state_dict(index=-1)["w"], frozen)
    assert ema.last_decays[-1] == 1.0


def test_decay_one_in_schedules_and_debias() -> None:
    assert schedules.constant(1.0)(5) == 1.0
    assert schedules.num_updates(1.0)(5) == 6 / 15
    assert schedules.inverse_gamma(max_decay=1.0)(10**9) > 0.999
    assert schedules.inverse_gamma(1.0, 1.0, 1.0, min_decay=1.0)(3) == 1.0
    model = Vec(2)
    model.set(3.0)
    ema = EMA(model, decay=[1.0, 0.5], debias=True)
    ema.update()
    # beta = 1 from the first update: the debiased average has no information yet, the live weights
    assert torch.equal(ema.averaged_state_dict(index=0)["w"], torch.full((2,), 3.0))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        schedules.constant(1.0000001)


def _reference_product(schedule: object, lo: int, hi: int) -> float:
    return math.prod(schedule(t) for t in range(lo, hi + 1))  # type: ignore[operator]


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.9999),
        schedules.half_life(300.0),
        schedules.uniform(),
        schedules.power_function(6.94),
        schedules.num_updates(0.999),
        schedules.num_updates(0.9999),
        schedules.ultralytics(0.9999, tau=20.0),
        schedules.inverse_gamma(0.999, 1.0, 0.75),
        schedules.inverse_gamma(0.9, 1.0, 2 / 3, min_decay=0.1),
    ],
    ids=repr,
)
@pytest.mark.parametrize(("lo", "hi"), [(1, 5000), (17, 3000), (4000, 9000), (2, LOOP_LIMIT + 1)])
def test_closed_form_products_match_the_step_by_step_product(schedule: object, lo: int, hi: int) -> None:
    expected = _reference_product(schedule, lo, hi)
    got = decay_product(schedule, lo, hi)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_short_products_are_the_step_by_step_product_bit_for_bit() -> None:
    for schedule in (schedules.constant(0.97), schedules.ultralytics(0.999, 7.0), schedules.uniform()):
        for lo, hi in ((1, 1), (3, 9), (10, 10 + LOOP_LIMIT - 1)):
            value = 1.0
            for t in range(lo, hi + 1):
                value *= schedule(t)
            assert decay_product(schedule, lo, hi) == value


@pytest.mark.parametrize(
    "schedule",
    [schedules.constant(0.999999), schedules.uniform(), schedules.power_function(2.0), schedules.num_updates(0.9)],
    ids=repr,
)
def test_update_every_ten_million_costs_a_bounded_number_of_schedule_calls(
    schedule: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 12: one averaging update with update_every=10**7 used to call the schedule ten
    million times (tens of seconds); the closed form calls it a handful of times."""
    calls = 0
    original = type(schedule).__call__

    def counting(self: object, t: int) -> float:
        nonlocal calls
        calls += 1
        return original(self, t)  # type: ignore[arg-type]

    monkeypatch.setattr(type(schedule), "__call__", counting)
    model = Vec(2)
    model.set(2.0)
    k = 10**7
    ema = EMA(model, decay=schedule, update_every=k)  # type: ignore[arg-type]
    ema.step = k - 1
    model.set(4.0)
    calls = 0
    ema.update()  # the averaging update at t = k
    assert calls <= 64
    beta = _closed(schedule, k)
    expected = beta * 2.0 + (1.0 - beta) * 4.0
    assert ema.averaged_state_dict()["w"][0].item() == pytest.approx(expected, rel=1e-6)


def _closed(schedule: object, k: int) -> float:
    if isinstance(schedule, schedules.constant):
        return schedule.decay**k
    if isinstance(schedule, (schedules.uniform, schedules.power_function)):
        return 0.0  # the product telescopes to (1 - 1) / k
    return 0.9**k  # num_updates(0.9) is capped at 0.9 from t = 80 on: vanishes


def test_update_every_ten_million_without_closed_form_is_bounded() -> None:
    """ultralytics and inverse_gamma reach their limit decay exactly after a known step; before it the
    product is summed in float64 logs in vectorised chunks."""
    for schedule in (schedules.ultralytics(0.9999, tau=2000.0), schedules.inverse_gamma(0.999, 1.0, 0.75)):
        start = time.perf_counter()
        value = decay_product(schedule, 1, 10**7)
        assert time.perf_counter() - start < 30  # generous: tens of milliseconds measured, no 10^7 loop
        assert 0.0 <= value < 1e-300 or value == pytest.approx(0.0, abs=1e-300)


def test_capturable_refuses_a_huge_update_every_without_a_closed_form_on_the_device() -> None:
    with pytest.raises(ValueError, match="closed-form product"):
        EMA(Vec(2), decay=schedules.ultralytics(0.99, 10.0), update_every=1000, capturable=True)
    ema = EMA(Vec(2), decay=0.99, update_every=1000, capturable=True)
    ema.update()
    assert ema.step == 1


def test_uninitialised_lazy_modules_are_refused_with_a_fix() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.weight' is an uninitialised lazy parameter.*forward pass"):
        EMA(model)
    model(torch.zeros(1, 3))
    EMA(model).update()  # fine once initialised


def test_meta_parameters_are_refused_with_a_fix() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"'weight' is on the meta device.*to_empty"):
        EMA(model)


def test_sparse_parameters_are_refused_unless_excluded() -> None:
    model = nn.Linear(3, 2)
    model.weight = nn.Parameter(torch.eye(2, 3).to_sparse())
    with pytest.raises(ValueError, match=r"'weight' is a sparse tensor.*exclude='weight'"):
        EMA(model)
    ema = EMA(model, exclude="weight")
    ema.update()
    assert ema.averaged_keys == ["bias"]


def test_construction_inside_inference_mode_is_refused_with_a_fix() -> None:
    model = nn.Linear(3, 2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside the inference_mode\(\) block"):
        EMA(model)
    EMA(model).update()


def test_flat_reader_without_storage_use_counts_falls_back_to_pointer_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The storage use count is a private torch API kept for speed; without it every update compares
    the parameters' data pointers (public) and still notices a re-pointed parameter."""
    monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = EMA(model, decay=0.5, flatten=True)
    assert ema.update_plans[0][2] == "flat"
    assert ema._groups[0].reader.refs is None  # type: ignore[attr-defined]
    ema.update()
    assert ema.update_plans[0][2] == "flat"
    with torch.no_grad():
        model[1].weight.data = torch.full_like(model[1].weight, 2.0)  # leaves the flat buffer
    before = ema.averaged_state_dict()["1.weight"].clone()
    ema.update()
    assert ema.update_plans[0][2] != "flat"
    assert torch.equal(ema.averaged_state_dict()["1.weight"], before.lerp(torch.full_like(before, 2.0), 0.5))


@pytest.mark.parametrize(
    "schedule",
    [schedules.inverse_gamma(max_decay=1.0), schedules.inverse_gamma(0.9999999, 1.0, 0.001)],
    ids=["max_decay_1", "overflowing_saturation"],
)
def test_long_products_of_schedules_that_never_saturate(schedule: schedules.inverse_gamma) -> None:
    assert decay_product(schedule, 3, 2000) == pytest.approx(_reference_product(schedule, 3, 2000), rel=1e-9)


@pytest.mark.parametrize(
    "decay", [0.99, schedules.half_life(20.0), schedules.uniform(), schedules.power_function(3.0)], ids=repr
)
def test_capturable_closed_form_products_match_the_host_path(decay: object) -> None:
    """update_every above the loop limit: the device computes the closed form, as the host does."""
    k = 3 * LOOP_LIMIT
    host_model, cap_model = Vec(3), Vec(3)
    host = EMA(host_model, decay=decay, update_every=k)  # type: ignore[arg-type]
    cap = EMA(cap_model, decay=decay, update_every=k, capturable=True)  # type: ignore[arg-type]
    for n in range(1, 2 * k + 1):
        for model in (host_model, cap_model):
            model.set(float(n % 7))
        host.update()
        cap.update()
    assert cap._products == pytest.approx(host._products, rel=1e-12, abs=0.0)
    assert torch.allclose(cap.averaged_state_dict()["w"], host.averaged_state_dict()["w"], rtol=1e-6, atol=0.0)
