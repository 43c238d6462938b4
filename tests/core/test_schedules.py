"""Schedules: closed forms, the peers' own decay functions, properties, and errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import schedules

decays = st.floats(min_value=0.0, max_value=0.99999, allow_nan=False)
steps = st.integers(min_value=1, max_value=10_000_000)


@pytest.mark.parametrize(
    ("schedule", "t", "expected"),
    [
        (schedules.constant(0.999), 1, 0.999),
        (schedules.constant(0.999), 10**6, 0.999),
        (schedules.ultralytics(0.9999, tau=2000), 1, 0.9999 * (1 - math.exp(-1 / 2000))),
        (schedules.ultralytics(0.9999, tau=2000), 2000, 0.9999 * (1 - math.exp(-1))),
        (schedules.num_updates(0.9999), 1, 2 / 11),
        (schedules.num_updates(0.9999), 90, 91 / 100),
        (schedules.num_updates(0.99), 10**6, 0.99),
        (schedules.inverse_gamma(0.9999, 1.0, 2 / 3), 1, 1 - 2 ** (-2 / 3)),
        (schedules.inverse_gamma(0.9999, 10.0, 1.0), 10, 0.5),
        (schedules.inverse_gamma(0.999, 1.0, 2 / 3), 10**9, 0.999),
        (schedules.inverse_gamma(0.9999, 1.0, 1.0, min_decay=0.7), 1, 0.7),
        (schedules.half_life(10), 1, 0.5 ** (1 / 10)),
        (schedules.power_function(0.0), 4, 0.75),
        (schedules.power_function(6.94), 1, 0.0),
        (schedules.power_function(6.94), 100, 0.99**7.94),
        (schedules.uniform(), 1, 0.0),
        (schedules.uniform(), 5, 0.8),
    ],
)
def test_closed_forms(schedule, t, expected):
    assert schedule(t) == pytest.approx(expected, rel=1e-12, abs=0)


def test_inverse_gamma_reaches_the_documented_decays():
    # ema-pytorch's docstring: power 2/3 reaches 0.999 at 31.6K steps and 0.9999 at 1M; 3/4: 0.999 at 10K.
    assert schedules.inverse_gamma(0.99999, power=2 / 3)(31_623) == pytest.approx(0.999, abs=1e-6)
    assert schedules.inverse_gamma(0.99999, power=2 / 3)(1_000_000) == pytest.approx(0.9999, abs=1e-7)
    assert schedules.inverse_gamma(0.99999, power=3 / 4)(10_000) == pytest.approx(0.999, abs=1e-6)


def test_num_updates_caps_the_decay_on_short_runs():
    """The (1+n)/(10+n) warm-up: asking for 0.9999 gives 0.9804 after 450 updates."""
    s = schedules.num_updates(0.9999)
    assert s(450) == pytest.approx(451 / 460)
    assert s(450) < 0.99
    assert s(8991) == pytest.approx(0.999)


def test_half_life_halves_the_weight():
    s = schedules.half_life(37)
    assert math.prod(s(t) for t in range(1, 38)) == pytest.approx(0.5, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(d=decays, tau=st.floats(min_value=1e-3, max_value=1e6), t=steps)
def test_ultralytics_in_range_and_monotone(d, tau, t):
    s = schedules.ultralytics(d, tau)
    assert 0.0 <= s(t) < 1.0
    assert s(t) <= s(t + 1) <= d


@settings(max_examples=200, deadline=None)
@given(
    d=decays,
    inv_gamma=st.floats(min_value=1e-3, max_value=1e4),
    power=st.floats(min_value=1e-2, max_value=5.0),
    t=steps,
)
def test_inverse_gamma_in_range_and_monotone(d, inv_gamma, power, t):
    s = schedules.inverse_gamma(d, inv_gamma, power)
    assert 0.0 <= s(t) <= d < 1.0
    assert s(t) <= s(t + 1)


@settings(max_examples=200, deadline=None)
@given(d=decays, t=steps, gamma=st.floats(min_value=-0.99, max_value=100.0), h=st.floats(min_value=1e-3, max_value=1e7))
def test_every_schedule_stays_in_unit_interval(d, t, gamma, h):
    for s in (
        schedules.constant(d),
        schedules.num_updates(d),
        schedules.power_function(gamma),
        schedules.half_life(h),
        schedules.uniform(),
    ):
        assert 0.0 <= s(t) < 1.0, s


@settings(max_examples=100, deadline=None)
@given(t=steps)
def test_power_function_zero_is_uniform(t):
    assert schedules.power_function(0.0)(t) == pytest.approx(schedules.uniform()(t), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda: schedules.constant(1.0 + 1e-12), ValueError),
        (lambda: schedules.constant(-0.1), ValueError),
        (lambda: schedules.constant(float("nan")), ValueError),
        (lambda: schedules.constant("0.9"), TypeError),
        (lambda: schedules.constant(True), TypeError),
        (lambda: schedules.ultralytics(0.9999, tau=0), ValueError),
        (lambda: schedules.ultralytics(1.5), ValueError),
        (lambda: schedules.inverse_gamma(0.9, min_decay=0.95), ValueError),
        (lambda: schedules.inverse_gamma(0.9, power=-1), ValueError),
        (lambda: schedules.half_life(0), ValueError),
        (lambda: schedules.power_function(-1.0), ValueError),
    ],
)
def test_bad_parameters_raise(factory, error):
    with pytest.raises(error):
        factory()


def test_schedules_reject_step_zero():
    with pytest.raises(ValueError, match="t >= 1"):
        schedules.uniform()(0)


def test_schedules_are_values():
    assert schedules.constant(0.9) == schedules.constant(0.9)
    assert hash(schedules.ultralytics()) == hash(schedules.ultralytics())
    assert repr(schedules.num_updates(0.99)) == "num_updates(decay=0.99)"
    assert schedules.as_schedule(0.5) == schedules.constant(0.5)


def test_power_function_accepts_a_numpy_gamma_like_every_schedule_argument() -> None:
    import numpy as np

    assert schedules.power_function(np.float32(6.94)) == schedules.power_function(float(np.float32(6.94)))
    with pytest.raises(TypeError, match="gamma must be a real number"):
        schedules.power_function(True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: schedules.ultralytics(tau=v), "tau"),
        (lambda v: schedules.inverse_gamma(inv_gamma=v), "inv_gamma"),
        (lambda v: schedules.inverse_gamma(power=v), "power"),
        (lambda v: schedules.half_life(v), "steps"),
        (lambda v: schedules.ijepa(10, 2, ipe_scale=v), "ipe_scale"),
    ],
)
def test_positive_arguments_take_numpy_scalars_and_refuse_bools_by_name(build, name) -> None:
    import numpy as np

    assert build(np.float32(2.5)) == build(2.5)  # np.float32 is no float subclass
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        build(True)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=name):
            build(bad)
