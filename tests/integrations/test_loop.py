"""polyak.integrations.loop: the optimizer step hook updates exactly as a hand-written ema.update()."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from polyak import EMA
from polyak.integrations.loop import EMAStepHook, update_on_step


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = (model(x) - x[:, :2]).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def data(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) for _ in range(n)]


def test_hook_matches_manual_updates_and_remove_stops_them() -> None:
    manual_model, hooked_model = net(), net()
    manual_opt = torch.optim.SGD(manual_model.parameters(), lr=0.1, momentum=0.9)
    hooked_opt = torch.optim.SGD(hooked_model.parameters(), lr=0.1, momentum=0.9)
    manual, hooked = EMA(manual_model, decay=0.7), EMA(hooked_model, decay=0.7)
    handle = update_on_step(hooked, hooked_opt)
    assert isinstance(handle, EMAStepHook)
    assert handle.active
    for x in data():
        step(manual_model, manual_opt, x)
        manual.update()
        step(hooked_model, hooked_opt, x)
    assert hooked.step == manual.step == 6
    for (k, a), b in zip(manual.averaged_state_dict().items(), hooked.averaged_state_dict().values()):
        assert torch.equal(a, b), k
    handle.remove()
    assert not handle.active
    before = hooked.averaged_state_dict()
    step(hooked_model, hooked_opt, data(1)[0])
    assert hooked.step == 6
    for k, v in hooked.averaged_state_dict().items():
        assert torch.equal(v, before[k]), k
    handle.remove()  # a second remove is harmless


def test_double_registration_is_refused_until_removed() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    handle = update_on_step(ema, opt)
    with pytest.raises(RuntimeError, match="already attached"):
        update_on_step(ema, opt)
    step(model, opt, data(1)[0])
    assert ema.step == 1  # one update per step, not two
    handle.remove()
    with update_on_step(ema, opt) as again:  # allowed again after remove; the with block removes it
        step(model, opt, data(1)[0])
        assert again.active
    assert not again.active
    step(model, opt, data(1)[0])
    assert ema.step == 2
    other = EMA(model, decay=[0.5, 0.99])  # a second EMA on the same optimizer is fine
    update_on_step(ema, opt)
    update_on_step(other, opt)
    step(model, opt, data(1)[0])
    assert (ema.step, other.step) == (3, 1)


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    update_on_step(ema, opt)
    for i, x in enumerate(data(8), start=1):
        (model(x).square().mean() / 4).backward()
        if i % 4 == 0:
            opt.step()
            opt.zero_grad()
    assert ema.step == 2


def test_steps_skipped_by_grad_scaler_do_not_update() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    update_on_step(ema, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = data(1)[0]
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert ema.step == 1
    opt.zero_grad()
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the step is skipped, and so is the EMA update
    scaler.update()
    assert ema.step == 1


def test_errors_and_no_leak() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="expects a polyak.EMA"):
        update_on_step(model, opt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expects a torch.optim.Optimizer"):
        update_on_step(EMA(model), model)  # type: ignore[arg-type]
    ema = EMA(model)
    update_on_step(ema, opt)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None  # the registry does not keep an optimizer alive


@pytest.mark.parametrize("first", ["attach", "update_on_step"])
@pytest.mark.parametrize("second", ["attach", "update_on_step"])
def test_attach_and_update_on_step_share_one_registry(first: str, second: str) -> None:
    """One optimizer.step() is one update, whichever names installed the hook (both used to count twice)."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    install = {"attach": ema.attach, "update_on_step": lambda o: update_on_step(ema, o)}
    handle = install[first](opt)
    with pytest.raises(RuntimeError, match="already attached"):
        install[second](opt)
    step(model, opt, data(1)[0])
    assert ema.step == 1
    handle.remove()
    again = install[second](opt)  # allowed once the first is removed
    step(model, opt, data(1)[0])
    assert ema.step == 2
    ema.detach()  # detach removes the hook whichever name installed it
    assert not again.active
    step(model, opt, data(1)[0])
    assert ema.step == 2


def test_one_hook_per_ema_across_optimizers() -> None:
    """Two optimizers stepping one model would update the average twice per iteration: refused."""
    model = net()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    ema.attach(first)
    with pytest.raises(RuntimeError, match="steps last"):
        update_on_step(ema, second)
    step(model, first, data(1)[0])
    second.step()
    assert ema.step == 1


def test_handle_from_attach_frees_the_slot_when_removed() -> None:
    """handle.remove() on the handle ema.attach returned lets the EMA attach again (it used to stay
    'already attached' until ema.detach())."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    handle = ema.attach(opt)
    handle.remove()
    with ema.attach(opt) as again:
        step(model, opt, data(1)[0])
        assert again.active
        assert ema.step == 1
    step(model, opt, data(1)[0])
    assert ema.step == 1


def test_hook_frees_the_ema_with_the_optimizer() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    ema.attach(opt)
    ref = weakref.ref(ema)
    del ema, opt
    gc.collect()
    assert ref() is None  # the registry does not keep an EMA alive
