"""Every update path (foreach, gather, flat, blocked K > 1, masked) gives the reference numbers bit for bit.

The reference is the simple per-tensor loop ``shadow.lerp_(weight.to(shadow.dtype), 1 - beta)`` (a
copy before ``start_step``) over clones that no fast path touches.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA, _kernels, _readers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DECAYS = {1: [0.9], 3: [0.5, 0.9, 0.999]}


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 5), nn.Linear(5, 3))
    return model.to(dtype)


class Reference:
    """The reference arithmetic, tensor by tensor, on its own clones."""

    def __init__(self, model: nn.Module, decays: list[float], start_step: int = 0) -> None:
        self.model = model
        self.decays = decays
        self.start_step = start_step
        self.step = 0
        self.shadows = [{k: self._cast(v).clone() for k, v in self._averaged(model).items()} for _ in decays]

    @staticmethod
    def _averaged(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @staticmethod
    def _cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)

    def update(self) -> None:
        self.step += 1
        live = self._averaged(self.model)
        for shadows, decay in zip(self.shadows, self.decays):
            for key, shadow in shadows.items():
                source = live[key].to(device=shadow.device, dtype=shadow.dtype)
                if self.step <= self.start_step:
                    shadow.copy_(source)
                else:
                    shadow.lerp_(source, 1.0 - decay)


def perturb(model: nn.Module, step: int) -> None:
    """An in-place 'optimizer step' (keeps every tensor's storage, as real optimizers do)."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype))


def assert_same_bits(ema: EMA, ref: Reference) -> None:
    state = ema.state_dict()
    for k, shadows in enumerate(ref.shadows):
        assert set(state["averages"][k]) == set(shadows)
        for key, expected in shadows.items():
            got = state["averages"][k][key]
            assert got.dtype == expected.dtype, key
            assert torch.equal(got, expected), f"average {k}, {key}: max diff {(got - expected).abs().max()}"


def run_both(ema: EMA, ref: Reference, model: nn.Module, steps: int = 6) -> None:
    for step in range(steps):
        perturb(model, step)
        ema.update()
        ref.update()
    assert_same_bits(ema, ref)


@pytest.fixture(params=["foreach", "gather", "flat"])
def plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "foreach":
        monkeypatch.setattr(_readers, "GATHER_MEAN_NUMEL", 0)
    elif request.param == "gather":
        monkeypatch.setattr(_readers, "GATHER_MEAN_NUMEL", 1 << 30)
    return str(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_averages", [1, 3])
@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
def test_every_plan_matches_the_reference_bitwise(
    plan: str, dtype: torch.dtype, num_averages: int, blocked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if blocked:  # exercise the cache-blocked K > 1 loops on small tensors
        monkeypatch.setattr(_kernels, "BLOCK_ELEMENTS", 8)
    model = make_model(dtype)
    decays = DECAYS[num_averages]
    ref = Reference(model, decays, start_step=2)
    ema = EMA(model, decay=decays, start_step=2, flatten=plan == "flat")
    assert {p for _, _, p, _ in ema.update_plans} == {plan}
    run_both(ema, ref, model)


def test_flatten_makes_parameters_views_of_one_buffer_and_keeps_their_values() -> None:
    model = make_model(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    EMA(model, flatten=True)
    assert list(model.parameters()) == params  # identity kept: optimizers built before still work
    bases = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(bases) == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_flatten_with_an_optimizer_built_before_trains_and_averages_exactly() -> None:
    model = make_model(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ref = Reference(model, [0.8])
    ema = EMA(model, decay=0.8, flatten=True)
    x = torch.randn(16, 7)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update()
        ref.update()
    assert_same_bits(ema, ref)


def test_reassigned_parameter_after_flatten_falls_back_and_stays_exact(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model(torch.float32)
    ref = Reference(model, [0.7])
    ema = EMA(model, decay=0.7, flatten=True)
    run_both(ema, ref, model, steps=2)
    with torch.no_grad():
        model[0].weight.data = model[0].weight.detach().clone() + 1.0  # no longer a view of the flat buffer
    with caplog.at_level(logging.WARNING, logger="polyak"):
        ema.update()
    ref.update()
    assert "re-assigned" in caplog.text
    assert ema.update_plans[0][2] != "flat"
    assert_same_bits(ema, ref)


def test_gather_notices_a_reassigned_tensor() -> None:
    model = make_model(torch.float32)
    ref = Reference(model, [0.7])
    ema = EMA(model, decay=0.7)
    assert ema.update_plans[0][2] == "gather"  # tiny tensors: gathered by default
    run_both(ema, ref, model, steps=1)
    model[3].bias.data = torch.full_like(model[3].bias, 3.0)
    run_both(ema, ref, model, steps=2)


def test_reassigned_parameter_with_a_new_shape_is_a_clear_error() -> None:
    model = make_model(torch.float32)
    ema = EMA(model, decay=0.7)
    model[0].weight.data = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 4\)"):
        ema.update()


def test_large_tensors_use_foreach_and_small_ones_gather() -> None:
    big = nn.Linear(512, 512)  # 262K elements per weight: above the gather threshold
    small = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
    assert EMA(big).update_plans[0][2] == "foreach"
    assert EMA(small).update_plans[0][2] == "gather"


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("plan_name", ["foreach", "gather", "flat"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_never_enters_the_average(
    policy: str, plan_name: str, bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    if plan_name == "foreach":
        monkeypatch.setattr(_readers, "GATHER_MEAN_NUMEL", 0)
    model = make_model(torch.float32)
    ema = EMA(model, decay=[0.9, 0.5], nonfinite=policy, flatten=plan_name == "flat")  # type: ignore[arg-type]
    perturb(model, 0)
    ema.update()
    before = ema.state_dict()["averages"]
    with torch.no_grad():
        model[3].weight[1, 2] = bad
    if policy == "raise":
        with pytest.raises(ValueError, match=r"in 1 weight tensor\(s\): \['3.weight'\] at update step 2"):
            ema.update()
    else:
        ema.update()
        assert ema.skipped_updates == 1
    after = ema.state_dict()["averages"]
    for k in range(2):
        for key in before[k]:
            assert torch.equal(before[k][key], after[k][key]), key


def test_huge_finite_weights_are_not_a_false_alarm() -> None:
    model = make_model(torch.float32)
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # sum |w| overflows float32; every element is finite
    ema = EMA(model, decay=0.5)
    ema.update()
    assert ema.skipped_updates == 0
    assert torch.isfinite(ema.state_dict()["averages"][0]["0.weight"]).all()


def test_ignore_lets_nan_in() -> None:
    model = make_model(torch.float32)
    ema = EMA(model, decay=0.5, nonfinite="ignore")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()
    assert torch.isnan(ema.state_dict()["averages"][0]["0.weight"]).any()


@pytest.mark.parametrize("bad", [False, True])
def test_masked_lerp_is_the_reference_or_a_bitwise_no_op(bad: bool) -> None:
    torch.manual_seed(0)
    flat = torch.randn(3, 100)
    source = torch.randn(100)
    if bad:
        source[7] = float("nan")
    expected = flat.clone()
    if not bad:
        for k, w in enumerate([0.1, 0.6, 1.0]):
            _kernels._lerp_one_(expected[k], source, w)
    _kernels.masked_lerp_rows_(flat, source, [0.1, 0.6, 1.0], torch.tensor(not bad))
    assert torch.equal(flat, expected)


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("plan_name", ["foreach", "gather"])
def test_device_side_check_masks_then_reports_at_the_next_look(
    policy: str, plan_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA code path (flag kept on the device, update masked, reported later), run on CPU."""
    monkeypatch.setattr(EMA, "_check_on_device", lambda self: True)
    if plan_name == "foreach":
        monkeypatch.setattr(_readers, "GATHER_MEAN_NUMEL", 0)
    model = make_model(torch.float32)
    ref = Reference(model, [0.9, 0.6])
    ema = EMA(model, decay=[0.9, 0.6], nonfinite=policy)  # type: ignore[arg-type]
    run_both(ema, ref, model, steps=2)
    products = list(ema._products)
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    ema.update()  # masked: no error yet, nothing written
    with torch.no_grad():
        model[0].bias[0] = 0.0
    if policy == "raise":
        with pytest.raises(ValueError, match="at update step 3"):
            ema.synchronize()
    else:
        ema.synchronize()
        assert ema.skipped_updates == 1
    assert ema._products == pytest.approx(products)
    assert_same_bits(ema, ref)


def test_attach_updates_after_each_optimizer_step_and_detach_stops() -> None:
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference(model, [0.9])
    ema = EMA(model, decay=0.9)
    handle = ema.attach(opt)
    x = torch.randn(8, 7)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        ref.update()
    assert ema.step == 3
    assert_same_bits(ema, ref)
    with pytest.raises(RuntimeError, match="already attached"):
        ema.attach(opt)
    ema.detach()
    opt.step()
    assert ema.step == 3
    handle.remove()  # removing twice is harmless
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        ema.attach(model)  # type: ignore[arg-type]


@pytest.mark.parametrize("index", [0, 1, -1])
def test_index_selects_each_average_in_apply_copy_to_and_state_dict(index: int) -> None:
    model = make_model(torch.float32)
    ref = Reference(model, [0.3, 0.9])
    ema = EMA(model, decay=[0.3, 0.9])
    run_both(ema, ref, model, steps=3)
    expected = ref.shadows[index]
    sd = ema.averaged_state_dict(index=index)
    with ema.apply(index=index):
        applied = {k: v.clone() for k, v in model.state_dict().items()}
    other = make_model(torch.float32, seed=5)
    ema.copy_to(other, index=index)
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
        assert torch.equal(applied[key], value), key
        assert torch.equal(other.state_dict()[key], value), key


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_ema_of_a_compiled_model_uses_the_same_path_and_numbers() -> None:
    model = make_model(torch.float32)
    compiled = torch.compile(model)
    ref = Reference(model, [0.9, 0.5])
    ema = EMA(compiled, decay=[0.9, 0.5])
    run_both(ema, ref, model, steps=3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("num_averages", [1, 3])
def test_compiled_update_kernel_matches_eager(num_averages: int) -> None:
    """``torch.compile`` of the flat kernel (inductor may reassociate the lerp: close, not bitwise)."""
    torch.manual_seed(0)
    weights = [0.1, 0.01, 0.5][:num_averages]
    flat = torch.randn(num_averages, 1000)
    source = torch.randn(1000)
    eager = flat.clone()
    _kernels.lerp_rows_(eager, source, weights)
    compiled = torch.compile(_kernels.lerp_rows_, fullgraph=True)
    compiled(flat, source, weights)
    torch.testing.assert_close(flat, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_averages", [1, 3])
def test_cuda_update_never_syncs_and_masks_nan(num_averages: int) -> None:
    model = make_model(torch.float32).cuda()
    decays = DECAYS[num_averages]
    ref = Reference(model, decays)
    ema = EMA(model, decay=decays)
    for step in range(3):
        perturb(model, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside update() raises
        try:
            ema.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.update()
    assert_same_bits(ema, ref)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()
    with pytest.raises(ValueError, match="non-finite"):
        ema.synchronize()
    assert_same_bits(ema, ref)


@pytest.mark.parametrize("num_averages", [1, 3])
def test_unchecked_updates_gather_small_tensors_and_mid_sized_ones_only_for_several_averages(
    num_averages: int,
) -> None:
    model = make_model(torch.bfloat16)  # tiny tensors: a gather beats per-tensor kernels even read once
    decays = DECAYS[num_averages]
    ref = Reference(model, decays)
    ema = EMA(model, decay=decays, nonfinite="ignore")
    assert ema.update_plans[0][2] == "gather"
    run_both(ema, ref, model)
    mid = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 96))  # ~4.6K elements per tensor on average
    assert EMA(mid, decay=decays, nonfinite="ignore").update_plans[0][2] == (
        "foreach" if num_averages == 1 else "gather"
    )


def test_a_model_cast_after_construction_is_followed_on_every_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.half()`` re-points every tensor: the shadows (float32) keep averaging the new values."""
    monkeypatch.setattr(_readers, "GATHER_MEAN_NUMEL", 0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5))  # parameters only (see report)
    ema = EMA(model, decay=0.5, nonfinite="ignore")
    assert ema.update_plans[0][2] == "foreach"
    model.to(torch.float16)
    ref = Reference(model, [0.5])
    ref.shadows = [{k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}]
    run_both(ema, ref, model, steps=2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("flatten", [False, True])
def test_compiled_update_matches_eager_and_still_refuses_nan(flatten: bool) -> None:
    """``torch.compile(ema.update)`` runs (graph breaks where the host reads the flag) and agrees with
    eager to within inductor's reassociation of the lerp (measured: 1.2e-7)."""
    model = make_model(torch.bfloat16)
    compiled_ema = EMA(model, decay=[0.9, 0.5], flatten=flatten)
    eager_ema = EMA(model, decay=[0.9, 0.5])
    update = torch.compile(compiled_ema.update)
    for step in range(3):
        perturb(model, step)
        update()
        eager_ema.update()
    got, expected = compiled_ema.state_dict()["averages"], eager_ema.state_dict()["averages"]
    for k in range(2):
        for key in expected[k]:
            torch.testing.assert_close(got[k][key], expected[k][key], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        update()


def test_flatten_keeps_tied_weights_tied() -> None:
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 11, bias=False))
    model[1].weight = model[0].weight
    ref = Reference(model, [0.8, 0.3])
    for shadows in ref.shadows:
        del shadows["1.weight"]  # a tied tensor has one shadow, under its first name
    ema = EMA(model, decay=[0.8, 0.3], flatten=True)
    assert model[1].weight is model[0].weight
    assert ema.update_plans[0][2] == "flat"
    run_both(ema, ref, model, steps=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_model_with_cpu_shadows_offloads_through_pinned_memory(dtype: torch.dtype) -> None:
    model = make_model(dtype).cuda()
    ref = Reference(model, [0.9, 0.5])
    ref.shadows = [{k: v.cpu() for k, v in shadows.items()} for shadows in ref.shadows]
    ema = EMA(model, decay=[0.9, 0.5], device="cpu")
    assert ema.update_plans[0][2] == "offload"
    run_both(ema, ref, model, steps=3)


# --- the host-side finiteness screen and the flat plan's pointer screen ----------------------------------
SPECIALS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_screen_agrees_with_isfinite_on_special_values(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [
        [torch.tensor([big, big], dtype=dtype)],  # the sum overflows, every value is finite
        [torch.tensor([big], dtype=dtype), torch.tensor([big], dtype=dtype)],
        [torch.tensor([-big, -big, 1.0], dtype=dtype)],
        [torch.full((300,), 300.0, dtype=dtype)],  # 90,000: above float16's max as a float16 sum
        [torch.tensor([1.0, float("inf")], dtype=dtype), torch.tensor([float("-inf")], dtype=dtype)],
        [torch.zeros(0, dtype=dtype), torch.ones(3, dtype=dtype)],
        [torch.zeros(0, dtype=dtype)],
    ]
    for special in SPECIALS:
        for where in range(3):
            t = torch.ones(3, dtype=dtype)
            t[where] = special
            cases.append([torch.ones(2, dtype=dtype), t])
    for sources in cases:
        expected = all(bool(torch.isfinite(s).all()) for s in sources)
        assert _kernels.finite_on_host(sources) is expected, sources


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=6), min_size=1, max_size=4),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_finite_screen_is_exact(values: list[list[float]], dtype: torch.dtype) -> None:
    sources = [torch.tensor(v, dtype=torch.float32).to(dtype) for v in values]  # huge values round to inf
    assert _kernels.finite_on_host(sources) is all(bool(torch.isfinite(s).all()) for s in sources)


def test_finite_screen_handles_complex_and_integer_tensors() -> None:
    assert _kernels.finite_on_host([torch.tensor([1 + 2j]), torch.arange(3)])
    assert not _kernels.finite_on_host([torch.tensor([complex(1.0, float("nan"))])])


def test_flat_plan_compares_pointers_only_when_the_flat_buffer_gains_or_loses_a_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    compare = _readers.pointers_moved

    def counting(sources: list[torch.Tensor], ptrs: list[int]) -> bool:
        nonlocal calls
        calls += 1
        return compare(sources, ptrs)

    monkeypatch.setattr(_readers, "pointers_moved", counting)
    model = make_model(torch.float32)
    ref = Reference(model, [0.7])
    ema = EMA(model, decay=0.7, flatten=True)
    if _readers.storage_refs(model[0].weight) is None:
        pytest.skip("this torch does not expose storage use counts; every update compares pointers")
    run_both(ema, ref, model, steps=3)
    assert calls == 0  # steady state: one use count read per update, no per-tensor work
    kept = model[0].weight.detach().view(-1)  # a new alias of the flat buffer, nothing re-pointed
    run_both(ema, ref, model, steps=2)
    assert calls == 1
    assert ema.update_plans[0][2] == "flat"
    del kept
    run_both(ema, ref, model, steps=2)
    assert calls == 2
    assert ema.update_plans[0][2] == "flat"
    model[3].weight.data = model[3].weight.detach().clone()  # leaves the flat buffer
    perturb(model, 0)
    ema.update()
    ref.update()
    assert calls == 3  # noticed at the first update after it
    assert ema.update_plans[0][2] != "flat"
    assert_same_bits(ema, ref)


@pytest.mark.parametrize("kwargs", [{}, {"flatten": True}, {"nonfinite": "ignore"}, {"decay": [0.5, 0.9]}])
def test_default_update_called_inside_torch_compile_matches_eager(kwargs: dict[str, object]) -> None:
    """The default update under dynamo (graph breaks where it reads the host) gives the eager bits; the
    inductor backend differs only by its non-fused lerp (see test_capturable for fullgraph tracing)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = make_model(torch.float32)
        ema = EMA(model, **{"decay": 0.9, **kwargs})  # type: ignore[arg-type]
        update = torch.compile(ema.update, backend="eager") if compiled else ema.update
        for step in range(5):
            perturb(model, step)
            update()
        assert ema.step == 5
        results.append(ema.state_dict()["averages"])
    for eager, compiled in zip(*results):
        for key in eager:
            assert torch.equal(eager[key], compiled[key]), key


# --- the default update's steady state: no per-tensor Python work ----------------------------------------


class Mixed(nn.Module):
    """Shape classes interleaved in model order: 0-dim, 1-D of several lengths, 2-D of two widths, 4-D."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.a = nn.Linear(3, 4)
        self.conv = nn.Conv2d(2, 3, 3)
        self.temp = nn.Parameter(torch.tensor(-0.25))
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(3, 2)
        self.register_buffer("stat", torch.ones(5))


def test_gather_over_mixed_shape_classes_matches_the_reference_and_follows_repointed_tensors() -> None:
    model = Mixed()
    ref = Reference(model, [0.7, 0.9])
    ema = EMA(model, decay=[0.7, 0.9])
    assert ema.update_plans[0][2] == "gather"
    run_both(ema, ref, model, steps=3)
    with torch.no_grad():  # re-point a 0-dim, a 2-D and a 4-D tensor (same shapes)
        model.temp.data = torch.tensor(2.0)
        model.b.weight.data = model.b.weight.detach().clone() * 3
        model.conv.weight.data = torch.full_like(model.conv.weight, 0.5)
    run_both(ema, ref, model, steps=3)


def test_gather_compares_no_data_pointers_per_update(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    compare = _readers.pointers_moved

    def counting(sources: list[torch.Tensor], ptrs: list[int]) -> bool:
        nonlocal calls
        calls += 1
        return compare(sources, ptrs)

    monkeypatch.setattr(_readers, "pointers_moved", counting)
    model = make_model(torch.float32)
    ref = Reference(model, [0.7])
    ema = EMA(model, decay=0.7)
    assert ema.update_plans[0][2] == "gather"
    run_both(ema, ref, model, steps=4)
    assert calls == 0


def test_gather_of_a_tensor_reassigned_with_another_shape_raises_and_writes_nothing() -> None:
    model = Mixed()
    ema = EMA(model, decay=0.5)
    ema.update()
    before = {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}
    model.b.weight.data = torch.zeros(3, 4)  # same shape class as the (4, 4) original, fewer rows
    with pytest.raises(ValueError, match=r"'b.weight' has shape \(3, 4\)"):
        ema.update()
    model.b.weight.data = torch.zeros(4, 4)
    after = ema.state_dict()["averages"][0]
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_gather_follows_a_model_cast_to_half_bit_for_bit() -> None:
    model = Mixed()
    ema = EMA(model, decay=0.5)
    ema.update()
    model.half()
    ref = Reference(model, [0.5])
    ref.shadows = [{k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}]
    assert ema.update_plans[0][2] == "gather"
    run_both(ema, ref, model, steps=2)


def test_watch_screen_notices_a_reassigned_buffer_slot() -> None:
    model = Mixed()
    ema = EMA(model, decay=0.5)
    assert not ema._watch.moved()
    model._buffers["stat"] = torch.zeros(5)  # what module.to() does: no registration hook fires
    assert ema._watch.moved()


def test_a_reader_that_fails_before_any_write_is_rebuilt_and_read_again() -> None:
    """E.g. a model moved to another device after the EMA was built: ``cat`` into the old scratch raises
    before a shadow is written, so the update rebuilds the reader and goes on with the same bits."""
    model = make_model(torch.float32)
    ref = Reference(model, [0.7])
    ema = EMA(model, decay=0.7)
    run_both(ema, ref, model, steps=1)
    stale = ema._groups[0].reader

    def fail() -> torch.Tensor:
        raise RuntimeError("Expected all tensors to be on the same device")

    stale.read = fail  # type: ignore[method-assign]
    run_both(ema, ref, model, steps=2)
    assert ema._groups[0].reader is not stale
