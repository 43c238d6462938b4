"""Every user error gets a ValueError/TypeError that says what is wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyak import EMA, schedules

from .helpers import Vec


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"decay": 1.5}, ValueError, r"must be in \[0, 1\]"),
        ({"decay": -0.5}, ValueError, r"must be in \[0, 1\]"),
        ({"decay": [0.9, 1.2]}, ValueError, r"must be in \[0, 1\]"),
        ({"decay": []}, ValueError, "empty sequence"),
        ({"decay": lambda t: 1.5}, ValueError, r"returned 1.5 at t=1"),
        ({"decay": lambda t: torch.tensor(0.5)}, TypeError, "must return a Python float"),
        ({"start_step": -1}, ValueError, "start_step must be >= 0"),
        ({"update_every": 0}, ValueError, "update_every must be >= 1"),
        ({"update_every": 2.0}, TypeError, "update_every must be an int"),
        ({"buffers": "mean"}, ValueError, "buffers must be one of"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating"),
        ({"nonfinite": "warn"}, ValueError, "nonfinite must be one of"),
        ({"include": 3}, TypeError, "include takes names"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        EMA(net(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        EMA({"w": torch.zeros(2)})  # type: ignore[arg-type]


def test_model_without_floating_parameters():
    model = nn.Module()
    model.register_buffer("count", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no floating-point parameters"):
        EMA(model)


def test_schedule_that_goes_out_of_range_later():
    ema = EMA(Vec(), decay=lambda t: 0.5 if t < 3 else 1.5)
    ema.update()
    ema.update()
    with pytest.raises(ValueError, match=r"returned 1.5 at t=3"):
        ema.update()


def test_load_state_dict_errors_leave_the_average_untouched():
    ema = EMA(net(), decay=0.9)
    good = ema.state_dict()
    before = ema.state_dict()["averages"][0]

    def check(state, error, message):
        with pytest.raises(error, match=message):
            ema.load_state_dict(state)
        for k, v in ema.state_dict()["averages"][0].items():
            assert torch.equal(v, before[k])

    check([1, 2], TypeError, "expects a mapping")
    check({**good, "format": "timm"}, ValueError, "not a polyak EMA state dict")
    check({**good, "version": 99}, ValueError, "unsupported polyak EMA state version 99")
    check({**good, "averages": [good["averages"][0]] * 2}, ValueError, "holds 2 average")
    missing = {k: v for k, v in good["averages"][0].items() if k != "1.bias"}
    check({**good, "averages": [missing]}, ValueError, r"missing keys \['1.bias'\]")
    extra = {**good["averages"][0], "2.weight": torch.zeros(1)}
    check({**good, "averages": [extra]}, ValueError, r"unexpected keys \['2.weight'\]")
    wrong_shape = {**good["averages"][0], "1.bias": torch.zeros(3)}
    check(
        {**good, "averages": [wrong_shape]},
        ValueError,
        r"shape mismatch for '1.bias': state has \(3,\), model has \(2,\)",
    )
    wrong_dtype = {**good["averages"][0], "1.bias": torch.zeros(2, dtype=torch.float64)}
    check({**good, "averages": [wrong_dtype]}, ValueError, "dtype mismatch for '1.bias'")
    nan = {**good["averages"][0], "1.bias": torch.tensor([0.0, float("nan")])}
    check({**good, "averages": [nan]}, ValueError, r"NaN/inf in '1.bias'")
    check({**good, "step": -3}, ValueError, "'step' must be a non-negative int")
    check({**good, "config": {**good["config"], "debias": True}}, ValueError, "saved with debias=True")


def test_model_changed_after_the_ema_was_built():
    model = net()
    ema = EMA(model, decay=0.9)
    model[1] = nn.Linear(4, 2)  # same shapes, new parameters
    with pytest.raises(ValueError, match=r"parameter '1.weight' was replaced"):
        ema.update()
    model2 = net()
    ema2 = EMA(model2, decay=0.9)
    model2.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"added \['2.bias', '2.weight'\]"):
        ema2.update()
    model3 = net()
    ema3 = EMA(model3, decay=0.9)
    model3[1].weight.data = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(5, 4\)"):
        ema3.update()


def test_reassigned_buffer_is_followed():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.5)
    model.running_mean = torch.full((3,), 4.0)  # a module re-assigning its buffer
    ema.update()
    torch.testing.assert_close(ema.averaged_state_dict()["running_mean"], torch.full((3,), 2.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_raise_leaves_the_average_unchanged(bad):
    model = net()
    ema = EMA(model, decay=0.9)
    ema.update()
    before = ema.state_dict()
    with torch.no_grad():
        model[1].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in 1 weight tensor\(s\): \['1.weight'\]"):
        ema.update()
    assert ema.step == 1
    for k, v in ema.state_dict()["averages"][0].items():
        assert torch.equal(v, before["averages"][0][k])


def test_nonfinite_skip_and_ignore(caplog):
    model = net()
    skip = EMA(model, decay=0.9, nonfinite="skip")
    ignore = EMA(model, decay=0.9, nonfinite="ignore")
    before = skip.state_dict()["averages"][0]
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    skip.update()
    ignore.update()
    assert skip.skipped_updates == 1
    assert skip.step == 1
    assert "skipped EMA update" in caplog.text
    for k, v in skip.state_dict()["averages"][0].items():
        assert torch.equal(v, before[k])
    assert torch.isnan(ignore.state_dict()["averages"][0]["0.bias"]).any()


def test_huge_finite_weights_are_not_a_false_alarm():
    model = Vec(4)
    model.set(3e38)
    ema = EMA(model, decay=schedules.constant(0.5))
    ema.update()  # sum |x| overflows to inf; the exact check clears it
    assert ema.step == 1


def test_bad_index():
    ema = EMA(net(), decay=[0.9, 0.99])
    with pytest.raises(ValueError, match="keeps 2 average"):
        ema.averaged_state_dict(index=2)
    with pytest.raises(TypeError, match="index must be an int"):
        ema.copy_to(net(), index=0.5)  # type: ignore[arg-type]


def test_buffers_replaced_by_model_to_are_followed():
    """module.to()/.double() replace buffers through module._buffers directly (no hook fires)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.5, dtype=torch.float64)
    old = model[1].running_mean
    model.double()
    assert model[1].running_mean is not old
    with torch.no_grad():
        model[1].running_mean.fill_(4.0)
    ema.update()
    torch.testing.assert_close(ema.averaged_state_dict()["1.running_mean"], torch.full((3,), 2.0, dtype=torch.float64))
    live = model[1].running_mean.clone()
    with ema.apply():
        model[1].running_mean.fill_(-1.0)
    assert torch.equal(model[1].running_mean, live)


def test_parameters_swapped_behind_the_registration_hooks_are_caught():
    """Sharding wrappers (FSDP2's fully_shard, FSDP, DeepSpeed ZeRO-3) write module._parameters directly:
    no hook fires, and without a check the EMA would average the old tensors, which no longer train."""
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    ema = EMA(model, decay=0.9)
    ema.update()
    for module in model:
        for name, param in list(module._parameters.items()):
            module._parameters[name] = nn.Parameter(param.detach().clone())
    with pytest.raises(ValueError, match=r"was replaced by a new tensor \(wrapping the model in FSDP2"):
        ema.update()
