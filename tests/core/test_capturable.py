"""EMA(capturable=True): the device-side step gives the default path's numbers, with no host read.

The reference is the default EMA fed the same weights; "bit for bit" compares the raw bits (int views),
so a NaN or a flipped sign would be caught too (the weights here are random, never exactly zero).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA, _kernels, _readers, schedules

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


def weight_tensor(w: float, dtype: torch.dtype, k: int = 1) -> torch.Tensor:
    """(k,) copies of the weight, computed in float64 and cast as EMA(capturable=True) casts it."""
    return torch.full((k,), w, dtype=torch.float64).to(_kernels.lerp_weight_dtype(dtype))


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
        _kernels.lerp_rows_weighted_(got, source, weight_tensor(w, dtype, 3))
        assert torch.equal(bits(got), bits(expected)), (dtype, w)
        listed = [shadow[0].clone()]
        _kernels.lerp_lists_weighted_([listed], [source], weight_tensor(w, dtype))
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
        weights = weight_tensor(w, dtype, 2)
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


# --- EMA(capturable=True) against the default EMA ---------------------------------------------------------
SCHEDULES = [
    schedules.constant(0.9),
    schedules.ultralytics(0.999, tau=5.0),
    schedules.num_updates(0.999),
    schedules.inverse_gamma(0.999, 1.0, 2 / 3),
    schedules.half_life(4.0),
    schedules.power_function(6.94),
    schedules.uniform(),
]
CONFIGS = {
    "plain": {},
    "start_step": {"start_step": 3},
    "update_every": {"update_every": 3},
    "debias": {"debias": True},
    "all": {"start_step": 2, "update_every": 2, "debias": True},
}


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).to(dtype)


def perturb(model: nn.Module, step: int, poison: float | None = None) -> None:
    """New weights written in place, as an optimizer does (the same values for every model of the same
    architecture); ``poison`` goes into one weight, for this step only."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype))
        if poison is not None:
            model[0].weight[1, 2] = poison


def pair(model: nn.Module, **kwargs) -> tuple[EMA, EMA, nn.Module]:
    """A capturable EMA on ``model`` and a default EMA on a copy of it, built alike."""
    twin = copy.deepcopy(model)
    return EMA(model, capturable=True, **kwargs), EMA(twin, **kwargs), twin


def exact_decays(ema: EMA) -> bool:
    """ultralytics' tensor form uses torch.exp: its decays may differ from math.exp's in the last bit."""
    return not any(isinstance(s, schedules.ultralytics) for s in ema.schedules)


def assert_same(cap: EMA, ref: EMA) -> None:
    got, expected = cap.state_dict(), ref.state_dict()
    for field in ("step", "skipped_updates", "products", "last_decays"):
        if field in ("products", "last_decays") and not exact_decays(ref):
            assert got[field] == pytest.approx(expected[field], rel=1e-13, abs=1e-16), field
        else:
            assert got[field] == expected[field], field
    assert type(got["step"]) is int
    for k, average in enumerate(expected["averages"]):
        assert set(got["averages"][k]) == set(average)
        for key, value in average.items():
            mine = got["averages"][k][key]
            assert mine.dtype == value.dtype, key
            assert torch.equal(bits(mine), bits(value)), f"average {k}, {key}: max diff {(mine - value).abs().max()}"
    for k in range(cap.num_averages):
        for key, value in ref.averaged_state_dict(k).items():
            assert torch.equal(bits(cap.averaged_state_dict(k)[key]), bits(value)), key


def run_both(cap: EMA, ref: EMA, models: tuple[nn.Module, nn.Module], steps: int = 10) -> None:
    for step in range(steps):
        for model in models:
            perturb(model, step)
        cap.update()
        ref.update()
    assert_same(cap, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_averages", [1, 3])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_capturable_matches_the_default_path_bit_for_bit(schedule, config, num_averages, dtype):
    """Every schedule, copy steps, off-steps, debias, K = 1 and 3, fp32 and bf16 weights (fp32 shadows).
    ultralytics' decays may differ from the default path's in the last float64 bit (torch.exp); on these
    steps they do not, and the fp32 lerp weight would hide a 1-ulp float64 difference almost always."""
    decay = [schedule] if num_averages == 1 else [schedule, schedules.num_updates(0.99), schedules.power_function(0.5)]
    model = make_model(dtype)
    cap, ref, twin = pair(model, decay=decay, **CONFIGS[config])
    run_both(cap, ref, (model, twin))


PLANS: dict[str, Callable[[pytest.MonkeyPatch], dict[str, object]]] = {
    "gather": lambda mp: {},
    "flat": lambda mp: {"flatten": True},
    "foreach-masked": lambda mp: mp.setattr(_readers, "_gatherable", lambda *args: False) or {},
    "foreach": lambda mp: mp.setattr(_readers, "GATHER_MEAN_NUMEL", 0) or {"nonfinite": "ignore"},
    "gather-unchecked": lambda mp: {"nonfinite": "ignore"},
}


@pytest.mark.parametrize("shadow_dtype", [None, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_plan_and_shadow_dtype_matches_the_default_path(plan, shadow_dtype, monkeypatch):
    kwargs = PLANS[plan](monkeypatch)
    model = make_model(torch.float32)
    decay = [schedules.ultralytics(0.99, tau=3.0), 0.9, schedules.uniform()]
    cap, ref, twin = pair(model, decay=decay, start_step=2, update_every=2, dtype=shadow_dtype, **kwargs)
    expected_plan = {"gather": "gather", "flat": "flat", "gather-unchecked": "gather"}.get(plan, "foreach")
    assert {p for _, _, p, _ in cap.update_plans} == {expected_plan}
    run_both(cap, ref, (model, twin), steps=7)


@pytest.mark.parametrize("nonfinite", ["raise", "skip", "ignore"])
def test_off_steps_leave_the_shadows_bitwise_unchanged(nonfinite):
    """update_every=3: calls 1, 2, 4, 5 lerp with weight 0, which must change no bit; with the check on,
    even a NaN/inf weight on an off-step changes nothing and is not counted (the default path does not
    look at the weights on off-steps either)."""
    model = make_model()
    ema = EMA(model, decay=[0.9, schedules.uniform()], update_every=3, capturable=True, nonfinite=nonfinite)
    perturb(model, 0)
    ema.update()
    ema.update()
    perturb(model, 1)
    ema.update()  # an averaging step
    before = [bits(g.flat).clone() for g in ema._groups]
    poisons = [None, None] if nonfinite == "ignore" else [float("nan"), float("inf")]
    for step, poison in enumerate(poisons):
        perturb(model, 10 + step, poison)
        ema.update()
        assert all(torch.equal(bits(g.flat), b) for g, b in zip(ema._groups, before)), f"off-step {step}"
    ema.synchronize()  # nothing refused
    assert ema.step == 5
    assert ema.skipped_updates == 0


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("when", ["copy", "average"])
def test_a_nonfinite_update_is_masked_and_raised_at_synchronize(poison, when):
    """The poisoned call is a copy (start_step) or an averaging step; either way no average and no debias
    product moves, and the host hears of it at the next look."""
    model = make_model()
    ema = EMA(model, decay=[0.9, 0.5], start_step=1 if when == "copy" else 0, debias=True, capturable=True)
    steps = 0 if when == "copy" else 2
    for step in range(steps):
        perturb(model, step)
        ema.update()
    state = ema.state_dict()
    perturb(model, 99, poison)
    ema.update()  # no error here: the flag stays on the device
    for k, average in enumerate(state["averages"]):  # every average unchanged, bit for bit
        for key, view in zip(ema._groups[0].keys, ema._groups[0].views[k]):
            assert torch.equal(bits(view), bits(average[key])), key
    with pytest.raises(
        ValueError, match=rf"non-finite values \(NaN or inf\).* at update step {steps + 1}; the average"
    ):
        ema.synchronize()
    after = ema.state_dict()  # reported once: the next look does not raise again
    assert after["step"] == steps + 1
    assert after["products"] == state["products"] == ([1.0, 1.0] if when == "copy" else [0.81, 0.25])
    assert after["last_decays"] == state["last_decays"]


def test_skip_counts_refused_updates_like_the_default_path(caplog):
    model = make_model()
    cap, ref, twin = pair(model, decay=[0.9, schedules.power_function(1.0)], debias=True, nonfinite="skip")
    poisons = [None, None, float("nan"), None, float("inf"), float("nan"), None]
    with caplog.at_level(logging.WARNING, logger="polyak"):
        for step, poison in enumerate(poisons):
            for m in (model, twin):
                perturb(m, step, poison)
            cap.update()
            ref.update()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polyak"):
        assert_same(cap, ref)  # state_dict() looks: 3 skipped updates, step counts them, averages equal
    assert cap.skipped_updates == 3
    assert "skipped EMA update at 3 updates, the last at update step 6" in caplog.text
    cap.synchronize()
    assert cap.skipped_updates == 3  # counted once


def test_update_never_reads_the_device(monkeypatch):
    """With the check on and every feature used, update() is pure device work: no .item(), bool(),
    float(), .tolist() or copy to the host."""
    model = make_model()
    ema = EMA(
        model,
        decay=[schedules.ultralytics(0.999, tau=5), schedules.inverse_gamma(0.999), 0.9],
        start_step=2,
        update_every=2,
        debias=True,
        capturable=True,
    )

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside update()")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(6):
        perturb(model, step, float("nan") if step == 5 else None)
        ema.update()
    monkeypatch.undo()
    assert ema.step == 6
    with pytest.raises(ValueError, match="at update step 6"):
        ema.synchronize()


def test_state_dict_round_trips_between_capturable_and_default():
    model = make_model()
    kwargs = {"decay": [schedules.ultralytics(0.99, tau=4.0), 0.9], "start_step": 2, "update_every": 2, "debias": True}
    cap = EMA(model, capturable=True, **kwargs)
    for step in range(5):
        perturb(model, step)
        cap.update()
    saved = cap.state_dict()
    default = EMA(model, **kwargs)
    default.load_state_dict(saved)
    assert default.state_dict().keys() == saved.keys()
    assert_same(cap, default)
    for step in range(5, 9):  # and both go on alike
        perturb(model, step)
        cap.update()
        default.update()
    assert_same(cap, default)
    back = EMA(model, capturable=True, **kwargs)
    counters = [back._device.step, back._device.products]
    pointers = [t.data_ptr() for t in counters]
    back.load_state_dict(default.state_dict())
    assert [t.data_ptr() for t in counters] == pointers  # loaded in place: a captured graph stays valid
    assert back.step == 9
    for step in range(9, 12):
        perturb(model, step)
        back.update()
        default.update()
    assert_same(back, default)


def test_step_and_last_decays_read_as_python_numbers():
    model = make_model()
    ema = EMA(model, decay=[schedules.uniform(), 0.5], capturable=True)
    assert ema.step == 0
    for _ in range(4):
        ema.update()
    assert ema.step == 4
    assert type(ema.step) is int
    assert ema.last_decays == (0.75, 0.5)
    assert all(type(d) is float for d in ema.last_decays)
    assert "step=4" in repr(ema)
    ema.step = 2  # settable, as the plain attribute was
    assert ema.step == 2
    assert ema.state_dict()["step"] == 2
    assert "capturable=True" in repr(ema)
    assert "capturable" not in repr(EMA(model))


class Halving:
    """A user schedule with a tensor form: usable with capturable=True."""

    def __call__(self, t: int) -> float:
        return 0.9 - 0.5**t

    def at_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return 0.9 - torch.pow(torch.full_like(t, 0.5, dtype=torch.float64), t.to(torch.float64))


def test_a_user_schedule_with_a_tensor_form_is_capturable():
    model = make_model()
    cap, ref, twin = pair(model, decay=Halving())
    run_both(cap, ref, (model, twin), steps=5)


def test_capturable_errors_say_what_to_do():
    model = make_model()
    with pytest.raises(TypeError, match="has no tensor form.*at_tensor.*capturable=False"):
        EMA(model, decay=lambda t: 0.9, capturable=True)
    with pytest.raises(TypeError, match="capturable must be True or False"):
        EMA(model, capturable=1)

    class Wrong(Halving):
        def at_tensor(self, t: torch.Tensor) -> torch.Tensor:
            return torch.full_like(t, 0.25, dtype=torch.float64)

    with pytest.raises(ValueError, match=r"at_tensor\(1\) = 0.25 but schedule\(1\) = 0.4"):
        EMA(model, decay=Wrong(), capturable=True)
    with pytest.raises(ValueError, match="keeps the shadows on the weights' device.*Leave device=None"):
        EMA(model, device="meta", capturable=True)
    EMA(model, decay=lambda t: 0.9)  # a plain callable is fine without capturable


# --- torch.compile and CUDA graphs -------------------------------------------------------------------------
def compile_counting(fn: Callable[[], None], backend: str) -> tuple[Callable[[], None], list[int]]:
    """``torch.compile(fn, fullgraph=True)`` with a backend that counts the graphs it is handed."""
    from torch._dynamo.backends.registry import lookup_backend

    compiled: list[int] = []
    inner = lookup_backend(backend)

    def counting(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        compiled.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    return torch.compile(fn, backend=counting, fullgraph=True), compiled


def run_compiled(backend: str, steps: int = 20) -> tuple[EMA, EMA, list[int]]:
    """20 calls that cross the copy phase (start_step=3), off-steps (update_every=2), the ultralytics
    warm-up (tau=4) and a refused NaN update, compiled once, next to the default EMA on a twin model."""
    torch._dynamo.reset()
    model = make_model(torch.bfloat16)
    decay = [schedules.ultralytics(0.99, tau=4.0), schedules.inverse_gamma(0.999, power=0.75), 0.9]
    cap, ref, twin = pair(model, decay=decay, start_step=3, update_every=2, debias=True, nonfinite="skip")

    def train_step() -> None:
        cap.update()

    compiled, graphs = compile_counting(train_step, backend)
    for step in range(steps):
        for m in (model, twin):
            perturb(m, step, float("nan") if step == 8 else None)
        compiled()
        ref.update()
    return cap, ref, graphs


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_compiled_update_traces_once_and_equals_eager(backend):
    """fullgraph=True: no graph break; one graph for every step value (no recompile), bit for bit the
    default path's averages. "eager" runs dynamo's graph as traced; "aot_eager" (slow: ~1.5 s) runs the
    functionalised graph that inductor and CUDA graphs see, with the in-place view updates rewritten."""
    cap, ref, graphs = run_compiled(backend)
    assert len(graphs) == 1, f"compiled {len(graphs)} times"
    assert_same(cap, ref)
    assert cap.skipped_updates == 1


@pytest.mark.slow
def test_inductor_compiled_update_is_close_to_eager():
    """inductor decomposes lerp without the fused multiply-add of the eager kernel: equal to float32
    rounding, not bit for bit (measured: max difference 1.2e-7 on values of size ~1). The decays and
    counters are computed exactly."""
    cap, ref, graphs = run_compiled("inductor")
    assert len(graphs) == 1
    got, expected = cap.state_dict(), ref.state_dict()
    assert got["step"] == expected["step"]
    assert got["products"] == pytest.approx(expected["products"], rel=1e-13, abs=1e-16)
    for k, average in enumerate(expected["averages"]):
        for key, value in average.items():
            torch.testing.assert_close(got["averages"][k][key], value, rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_cuda_graph_replays_update_like_eager(nonfinite):
    """Capture ``ema.update()`` once (after a warm-up on a side stream) and replay it across the copy
    phase, off-steps and a NaN step: the same averages as the default EMA updated eagerly. Written for
    CUDA; skipped without a device (not yet run on one)."""
    model = make_model().cuda()
    decay = [schedules.num_updates(0.99), schedules.uniform(), schedules.ultralytics(0.99, tau=3.0)]
    cap, ref, twin = pair(model, decay=decay, start_step=2, update_every=2, debias=True, nonfinite=nonfinite)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            for m in (model, twin):
                perturb(m, step)
            cap.update()
            ref.update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap.update()  # recorded, not run
    for step in range(3, 12):
        for m in (model, twin):
            perturb(m, step, float("nan") if step == 7 else None)
        graph.replay()
        if nonfinite == "raise" and step == 7:
            with pytest.raises(ValueError, match="at update step 8"):
                cap.synchronize()
        ref_update(ref, nonfinite, step == 7)
    got, expected = cap.state_dict(), ref.state_dict()
    assert got["step"] == expected["step"] == 12
    assert got["products"] == pytest.approx(expected["products"], rel=1e-12)
    for k, average in enumerate(expected["averages"]):
        for key, value in average.items():
            torch.testing.assert_close(got["averages"][k][key], value, rtol=1e-6, atol=1e-7)


def ref_update(ref: EMA, nonfinite: str, poisoned: bool) -> None:
    """The default EMA on CUDA reports a NaN at its next look, like the capturable one."""
    ref.update()
    if poisoned and nonfinite == "raise":
        with pytest.raises(ValueError, match="non-finite"):
            ref.synchronize()


@pytest.mark.cuda
@cuda
def test_capturable_refuses_cpu_offload():
    with pytest.raises(ValueError, match="keeps the shadows on the weights' device"):
        EMA(make_model().cuda(), device="cpu", capturable=True)
