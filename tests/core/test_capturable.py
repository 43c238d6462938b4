"""EMA(capturable=True): the device-side step gives the default path's numbers, with no host read.

The reference is the default EMA fed the same weights; "bit for bit" compares the raw bits (int views),
so a NaN or a flipped sign would be caught too (the weights here are random, never exactly zero).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import _kernels, schedules

# --- the tensor form of every schedule ------------------------------------------------------------------
decays = st.floats(min_value=0.0, max_value=0.99999, allow_nan=False)
positive = st.floats(min_value=1e-3, max_value=1e6)
built_in = st.one_of(
    st.builds(schedules.constant, decays),
    st.builds(schedules.ultralytics, decays, positive),
    st.builds(schedules.num_updates, decays),
    st.builds(
        schedules.inverse_gamma,
        st.just(0.9999),
        st.floats(min_value=1e-3, max_value=1e4),
        st.one_of(st.sampled_from([2 / 3, 0.75, 1.0, 2.0, 3.0, 0.5]), st.floats(min_value=1e-2, max_value=5.0)),
        st.floats(min_value=0.0, max_value=0.9),
    ),
    st.builds(schedules.half_life, positive),
    st.builds(schedules.power_function, st.floats(min_value=-0.99, max_value=100.0)),
    st.builds(schedules.uniform),
)
steps = st.one_of(st.integers(min_value=1, max_value=100), st.integers(min_value=1, max_value=10**12))


@settings(max_examples=300, deadline=None)
@given(schedule=built_in, t=steps)
def test_tensor_form_equals_the_scalar_form(schedule, t):
    """Bit for bit for a 0-dim step on CPU; ultralytics to one float64 ulp of 1.0 (torch.exp vs math.exp)."""
    value = schedule.at_tensor(torch.tensor(t))
    assert isinstance(value, torch.Tensor)
    assert value.dtype == torch.float64
    assert value.shape == ()
    expected = schedule(t)
    if isinstance(schedule, schedules.ultralytics):
        assert abs(value.item() - expected) <= 2.0**-52
    else:
        assert value.item() == expected


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.9),
        schedules.ultralytics(0.999, tau=7.0),
        schedules.num_updates(0.999),
        schedules.inverse_gamma(0.999, 2.0, 0.75),
        schedules.half_life(5.0),
        schedules.power_function(6.94),
        schedules.uniform(),
    ],
    ids=repr,
)
def test_tensor_form_is_elementwise(schedule):
    t = torch.arange(1, 25).reshape(4, 6)
    value = schedule.at_tensor(t)
    assert value.shape == t.shape
    expected = [schedule(int(s)) for s in t.flatten()]
    assert value.flatten().tolist() == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert isinstance(schedule, schedules.TensorSchedule)


def test_plain_callables_are_not_tensor_schedules():
    assert not isinstance(lambda t: 0.9, schedules.TensorSchedule)
    assert math.isclose(schedules.half_life(1.0).at_tensor(torch.tensor(3)).item(), 0.5)


# --- tensor-weight kernels --------------------------------------------------------------------------------
SHADOW_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality means bit for bit (NaN == NaN, -0.0 != 0.0)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def weight_tensor(w: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(w, dtype=torch.float64).to(_kernels.lerp_weight_dtype(dtype))


@pytest.mark.parametrize("dtype", SHADOW_DTYPES, ids=str)
def test_tensor_weight_lerp_gives_the_scalar_weight_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    shadow = torch.randn(3, 257, generator=gen).to(dtype)
    source = torch.randn(257, generator=gen).to(dtype)
    for w in (1e-4, 0.1, 0.3, 0.5, 0.7, 1 - 0.999**3, 0.99):
        expected = shadow.clone()
        for k in range(3):
            expected[k].lerp_(source, w)
        got = shadow.clone()
        _kernels.lerp_rows_weighted_(got, source, [weight_tensor(w, dtype)] * 3)
        assert torch.equal(bits(got), bits(expected)), (dtype, w)
        listed = [shadow[0].clone()]
        _kernels.lerp_lists_weighted_([listed], [source], [weight_tensor(w, dtype)])
        assert torch.equal(bits(listed[0]), bits(expected[0])), (dtype, w)


@pytest.mark.parametrize("dtype", SHADOW_DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["rows", "lists"])
def test_tensor_weight_lerp_copies_at_one_keeps_at_zero_and_masks(dtype, kernel):
    gen = torch.Generator().manual_seed(1)
    shadow = torch.randn(2, 64, generator=gen).to(dtype)
    source = torch.randn(64, generator=gen).to(dtype)
    poisoned = source.clone()
    poisoned[5] = float("nan")
    poisoned[9] = float("inf")

    def run(src: torch.Tensor, w: float, ok: bool | None) -> torch.Tensor:
        out = shadow.clone()
        flag = None if ok is None else torch.tensor(ok)
        weights = [weight_tensor(w, dtype)] * 2
        if kernel == "rows":
            _kernels.lerp_rows_weighted_(out, src, weights, flag)
        else:
            views = [[out[0, :32], out[0, 32:]], [out[1, :32], out[1, 32:]]]
            _kernels.lerp_lists_weighted_(views, [src[:32], src[32:]], weights, flag)
        return out

    assert torch.equal(bits(run(source, 1.0, None)), bits(source.expand(2, -1)))
    assert torch.equal(bits(run(source, 0.0, None)), bits(shadow))
    assert torch.equal(bits(run(source, 0.3, True)), bits(run(source, 0.3, None)))
    for w in (0.0, 0.3, 1.0):  # a refused update is a no-op whatever the weight, NaN and inf included
        assert torch.equal(bits(run(poisoned, w, False)), bits(shadow)), w
