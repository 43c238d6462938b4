"""apply/copy_to/averaged_state_dict/state_dict: swaps, restores, round trips, resume, and errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from polyak import EMA, schedules, update_bn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x[:, :2]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()


def test_apply_swaps_in_and_restores_exactly_even_on_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    train(model, opt, ema, 5, 0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.averaged_state_dict()
    with ema.apply() as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, averaged[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    with pytest.raises(ZeroDivisionError), ema.apply():
        model.train()
        model(torch.randn(4, 4))  # changes BatchNorm statistics inside the block
        1 / 0  # noqa: B018
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_apply_refuses_nesting_and_updates_inside():
    model = mlp()
    ema = EMA(model, decay=0.9)
    with ema.apply():
        with pytest.raises(RuntimeError, match="already active"), ema.apply():
            pass
        with pytest.raises(RuntimeError, match="inside `with ema.apply"):
            ema.update()
    ema.update()  # fine again afterwards


def test_update_bn_inside_apply_leaves_the_live_statistics_alone():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9, buffers="copy")
    train(model, opt, ema, 5, 0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(16, 4) for _ in range(3)]
    with ema.apply():
        assert update_bn(data, model) == 3
        torch.testing.assert_close(model[1].running_mean, model[0](torch.cat(data)).mean(0), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_copy_to_and_averaged_state_dict_agree():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=[0.9, 0.99])
    train(model, opt, ema, 5, 0)
    for index in (0, 1, -1):
        other = mlp(seed=3)
        ema.copy_to(other, index=index)
        expected = ema.averaged_state_dict(index=index)
        for k, v in other.state_dict().items():
            assert torch.equal(v, expected[k]), k
    fresh = mlp(seed=4)
    fresh.load_state_dict(ema.averaged_state_dict())


def test_copy_to_checks_everything_before_writing():
    ema = EMA(mlp(), decay=0.9)
    wrong = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatch for '3.weight': averaged \(2, 8\) vs target \(3, 8\)"):
        ema.copy_to(wrong)
    for k, v in wrong.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"missing keys \['3.bias', '3.weight'\]"):
        ema.copy_to(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))


def test_state_dict_round_trip_through_torch_save_weights_only():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=schedules.ultralytics(0.999, tau=20), debias=False)
    train(model, opt, ema, 7, 0)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["format"] == "polyak.ema"
    assert state["version"] == 1
    assert state["step"] == 7
    other = EMA(model, decay=schedules.ultralytics(0.999, tau=20))
    other.load_state_dict(state)
    assert other.step == 7
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(other.averaged_state_dict()[k], v)


def test_state_dict_tensors_own_their_storage():
    """Views into the flat buffer would make torch.save write the whole buffer once per tensor."""
    ema = EMA(mlp(), decay=0.9)
    for t in ema.state_dict()["averages"][0].values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("debias", [False, True])
def test_resume_equals_uninterrupted(debias):
    decay = [schedules.inverse_gamma(0.999, power=3 / 4), 0.9]
    model_a = mlp()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    ema_a = EMA(model_a, decay=decay, debias=debias, start_step=2, update_every=2)
    train(model_a, opt_a, ema_a, 6, 0)
    train(model_a, opt_a, ema_a, 5, 1)

    model_b = mlp()
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    ema_b = EMA(model_b, decay=decay, debias=debias, start_step=2, update_every=2)
    train(model_b, opt_b, ema_b, 6, 0)
    saved = (model_b.state_dict(), opt_b.state_dict(), ema_b.state_dict())
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    model_sd, opt_sd, ema_sd = torch.load(buf, weights_only=True)

    model_c = mlp(seed=9)
    model_c.load_state_dict(model_sd)
    opt_c = torch.optim.Adam(model_c.parameters(), lr=1e-2)
    opt_c.load_state_dict(opt_sd)
    ema_c = EMA(model_c, decay=decay, debias=debias, start_step=2, update_every=2)
    ema_c.load_state_dict(ema_sd)
    train(model_c, opt_c, ema_c, 5, 1)
    for index in (0, 1):
        for k, v in ema_a.averaged_state_dict(index).items():
            assert torch.equal(ema_c.averaged_state_dict(index)[k], v), k
    assert ema_c.step == ema_a.step == 11


def test_loading_a_state_saved_with_other_settings_logs_what_changed(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    model = nn.Linear(3, 2)
    saved = EMA(model, decay=0.9, start_step=2).state_dict()
    with caplog.at_level(logging.WARNING, logger="polyak"):
        EMA(model, decay=0.9, start_step=2).load_state_dict(saved)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="polyak"):
        EMA(model, decay=0.99, start_step=2, update_every=4).load_state_dict(saved)
    assert "decay ['constant(decay=0.9)'] -> ['constant(decay=0.99)']" in caplog.text
    assert "update_every 1 -> 4" in caplog.text
    assert "start_step" not in caplog.text
