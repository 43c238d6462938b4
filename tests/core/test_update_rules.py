"""The update rule against closed forms and a float64 reference; schedules, start_step, update_every,
debias; dtypes; property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import EMA, schedules

from .helpers import Vec, reference_average


def _feed(ema: EMA, model: Vec, values) -> None:
    for v in values:
        model.set(v)
        ema.update()


def _shadow(ema: EMA, index: int = 0) -> torch.Tensor:
    return ema.state_dict()["averages"][index]["w"]


def test_constant_decay_closed_form():
    beta, n = 0.9, 25
    model = Vec(3, torch.float64)
    model.set(2.0)
    ema = EMA(model, decay=beta)
    _feed(ema, model, [float(i) for i in range(1, n + 1)])
    # s_N = beta^N w0 + (1 - beta) sum_n beta^(N - n) n
    expected = beta**n * 2.0 + (1 - beta) * sum(beta ** (n - i) * i for i in range(1, n + 1))
    torch.testing.assert_close(_shadow(ema), torch.full((3,), expected, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.99),
        schedules.ultralytics(0.9999, tau=50),
        schedules.num_updates(0.999),
        schedules.inverse_gamma(0.9999, 1.0, 3 / 4),
        schedules.half_life(20),
        schedules.power_function(6.94),
        schedules.uniform(),
    ],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize(
    ("start_step", "update_every", "debias"), [(0, 1, False), (7, 1, False), (0, 4, False), (5, 3, True)]
)
def test_long_sequence_matches_float64_reference(schedule, start_step, update_every, debias):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(16, generator=g, dtype=torch.float64) + 0.01 * i for i in range(600)]
    model = Vec(16, torch.float32)
    w0 = model.w.detach().clone()
    ema = EMA(model, decay=schedule, start_step=start_step, update_every=update_every, debias=debias)
    _feed(ema, model, weights)
    expected = reference_average(
        w0, [w.float() for w in weights], schedule, start_step=start_step, update_every=update_every, debias=debias
    )
    torch.testing.assert_close(ema.averaged_state_dict()["w"].double(), expected, rtol=1e-5, atol=2e-6)


def test_start_step_copies_the_weights():
    model = Vec(2)
    ema = EMA(model, decay=0.99, start_step=3)
    for v in (5.0, -1.0, 7.0):
        model.set(v)
        ema.update()
        assert torch.equal(_shadow(ema), torch.full((2,), v))
    model.set(8.0)
    ema.update()  # t = 1: 0.99 * 7 + 0.01 * 8
    torch.testing.assert_close(_shadow(ema), torch.full((2,), 0.99 * 7 + 0.01 * 8))


def test_update_every_multiplies_the_decays():
    """With the weights constant between updates, update_every=k gives the k=1 result (ema-pytorch keeps
    beta and does not)."""
    blocks = [3.0, -2.0, 10.0, 4.0, 0.5]
    k = 4
    a_model, b_model = Vec(3, torch.float64), Vec(3, torch.float64)
    a = EMA(a_model, decay=0.9, update_every=1)
    b = EMA(b_model, decay=0.9, update_every=k)
    for v in blocks:
        _feed(a, a_model, [v] * k)
        _feed(b, b_model, [v] * k)
    torch.testing.assert_close(_shadow(b), _shadow(a), rtol=1e-13, atol=0)
    assert b.last_decays == pytest.approx((0.9**k,))


def test_update_every_only_averages_every_kth_call():
    model = Vec(1, torch.float64)
    ema = EMA(model, decay=0.5, update_every=3)
    _feed(ema, model, [1.0, 1.0])
    assert _shadow(ema).item() == 0.0
    _feed(ema, model, [1.0])
    assert _shadow(ema).item() == pytest.approx(1 - 0.5**3)
    assert ema.step == 3


def test_debias_is_exact_from_the_first_update():
    model = Vec(4)
    model.set(1.0)
    ema = EMA(model, decay=0.9999, debias=True)
    before = ema.averaged_state_dict()["w"]
    assert torch.equal(before, model.w.detach())  # nothing averaged yet: the live weights
    model.set(3.0)
    ema.update()
    torch.testing.assert_close(ema.averaged_state_dict()["w"], torch.full((4,), 3.0))
    model.set(5.0)
    ema.update()  # (b(1-b) 3 + (1-b) 5) / (1 - b^2)
    b = 0.9999
    expected = (b * (1 - b) * 3 + (1 - b) * 5) / (1 - b**2)
    torch.testing.assert_close(ema.averaged_state_dict()["w"], torch.full((4,), expected))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=40))
def test_uniform_is_the_arithmetic_mean(values):
    model = Vec(1, torch.float64)
    ema = EMA(model, decay=schedules.uniform())
    _feed(ema, model, values)
    assert _shadow(ema).item() == pytest.approx(math.fsum(values) / len(values), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    c=st.floats(min_value=-6e4, max_value=6e4),  # inside the float16 range
    decay=st.floats(min_value=0.0, max_value=0.99999),
    n=st.integers(min_value=1, max_value=30),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_constant_weights_are_a_fixed_point(c, decay, n, dtype):
    model = Vec(3, dtype)
    model.set(c)
    ema = EMA(model, decay=decay)
    before = ema.averaged_state_dict()["w"].clone()
    _feed(ema, model, [c] * n)
    assert torch.equal(ema.averaged_state_dict()["w"], before)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-100, max_value=100), min_size=1, max_size=20),
    decay=st.floats(min_value=0.0, max_value=0.9999),
)
def test_average_stays_in_the_hull_of_the_weights(values, decay):
    model = Vec(1, torch.float64)
    model.set(values[0])
    ema = EMA(model, decay=decay)
    _feed(ema, model, values)
    assert min(values) - 1e-9 <= _shadow(ema).item() <= max(values) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_against_float64_reference(dtype):
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, generator=g).to(dtype) for _ in range(200)]
    model = Vec(64, dtype)
    w0 = model.w.detach().clone()
    ema = EMA(model, decay=0.99)
    assert ema.state_dict()["averages"][0]["w"].dtype == torch.float32  # fp32 shadow for half weights
    _feed(ema, model, weights)
    expected = reference_average(w0, weights, schedules.constant(0.99))
    torch.testing.assert_close(_shadow(ema).double(), expected, rtol=1e-5, atol=1e-6)
    assert ema.averaged_state_dict()["w"].dtype == dtype


def test_bf16_shadow_never_moves_but_fp32_shadow_does():
    """The pitfall: at decay 0.9999, (1 - d) * (w - s) is below half a bf16 ulp, so a bf16 shadow is stuck."""
    model = Vec(8, torch.bfloat16)
    model.set(1.0)
    stuck = EMA(model, decay=0.9999, dtype=torch.bfloat16)
    moving = EMA(model, decay=0.9999)
    model.set(2.0)
    for _ in range(1000):
        stuck.update()
        moving.update()
    assert torch.equal(_shadow(stuck), torch.ones(8, dtype=torch.bfloat16))
    expected = 2.0 - 0.9999**1000  # s_N = 2 - (2 - 1) d^N
    torch.testing.assert_close(_shadow(moving), torch.full((8,), expected), rtol=1e-6, atol=0)


def test_several_decays_equal_separate_averages():
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(5, generator=g) for _ in range(50)]
    decays = [0.9, schedules.ultralytics(0.999, tau=10), 0.5]
    model = Vec(5)
    multi = EMA(model, decay=decays)
    singles = [EMA(model, decay=d) for d in decays]
    for w in weights:
        model.set(w)
        multi.update()
        for s in singles:
            s.update()
    for k, single in enumerate(singles):
        assert torch.equal(multi.averaged_state_dict(index=k)["w"], single.averaged_state_dict()["w"])
    assert multi.num_averages == 3
