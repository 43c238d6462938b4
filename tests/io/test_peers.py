"""Interop with the real peer libraries, both directions.

Import: the peer averages a short training run; its checkpoint, read by polyak, gives an EMA whose
averaged weights equal the peer's exactly. Export: polyak's average, written in the peer's format, loads
into the peer's own object (strict) and holds the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from torch import nn

import polyak
from polyak.io import export, from_peer
from tests.peers import timm_model_ema, ultralytics_model_ema

from .conftest import make_model

pytestmark = pytest.mark.peers


def _train(model: nn.Module, steps: int, after_step: Callable[[], None]) -> None:
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step()


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], floats_only: bool = False) -> None:
    """Equal keys and bitwise equal tensors. ``floats_only``: integer buffers (``num_batches_tracked``) are
    never averaged; polyak takes them from the live model, so after an import they are compared only
    where the live model was loaded too."""
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        if floats_only and not value.is_floating_point():
            continue
        assert torch.equal(actual[key], value.to(actual[key].dtype)), key


def _polyak_trained(steps: int = 5) -> polyak.EMA:
    model = make_model(0)
    ema = polyak.EMA(model, decay=0.8)
    _train(model, steps, ema.update)
    return ema


def _differs(ema: polyak.EMA) -> None:
    """The export tests are only meaningful when the average differs from the live weights."""
    live = ema.model.state_dict()
    assert any(not torch.equal(v, live[k]) for k, v in ema.averaged_state_dict().items())


# --- timm ----------------------------------------------------------------------------------------------
def test_timm_import(tmp_path: Path) -> None:
    timm_ema = timm_model_ema()
    if timm_ema is None:
        pytest.skip("timm not installed")
    model = make_model(0)
    peer = timm_ema.ModelEmaV3(model, decay=0.8)
    _train(model, 5, lambda: peer.update(model))
    torch.save(
        {"epoch": 1, "state_dict": model.state_dict(), "state_dict_ema": peer.module.state_dict()}, tmp_path / "t.pth"
    )
    torch.save(peer.state_dict(), tmp_path / "v3.pth")  # ModelEmaV3's own state_dict: module.* keys
    for name in ("t.pth", "v3.pth"):
        ema = from_peer(tmp_path / name, make_model(1), decay=0.8)
        _assert_same(ema.averaged_state_dict(), peer.module.state_dict(), floats_only=True)
    # polyak.load also restores the raw model a timm checkpoint carries
    model2 = make_model(2)
    ema2 = polyak.EMA(model2, decay=0.8)
    polyak.load(tmp_path / "t.pth", ema2, model=model2)
    _assert_same(model2.state_dict(), model.state_dict())
    _assert_same(ema2.averaged_state_dict(), peer.module.state_dict())


def test_timm_export(tmp_path: Path) -> None:
    timm_ema = timm_model_ema()
    if timm_ema is None:
        pytest.skip("timm not installed")
    ema = _polyak_trained()
    _differs(ema)
    export(tmp_path / "t.pth", ema, format="timm")
    ckpt = torch.load(tmp_path / "t.pth", weights_only=True)
    peer = timm_ema.ModelEmaV3(make_model(3))
    peer.load_state_dict({f"module.{k}": v for k, v in ckpt["state_dict_ema"].items()})
    _assert_same(peer.module.state_dict(), ema.averaged_state_dict())
    _assert_same(ckpt["state_dict"], ema.model.state_dict())


# --- ema-pytorch ---------------------------------------------------------------------------------------
def test_ema_pytorch_both_ways(tmp_path: Path) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = make_model(0)
    peer = ema_pytorch.EMA(model, beta=0.8, update_after_step=0, update_every=1)
    _train(model, 5, peer.update)
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    ema = from_peer(tmp_path / "peer.pt", make_model(1), decay=0.8)
    _assert_same(ema.averaged_state_dict(), peer.ema_model.state_dict(), floats_only=True)
    assert ema.step == int(peer.step)

    mine = _polyak_trained()
    _differs(mine)
    export(tmp_path / "mine.pt", mine, format="ema_pytorch")
    other = ema_pytorch.EMA(make_model(4), beta=0.8)
    other.load_state_dict(torch.load(tmp_path / "mine.pt", weights_only=True))  # strict
    _assert_same(other.ema_model.state_dict(), mine.averaged_state_dict())
    _assert_same(other.online_model.state_dict(), mine.model.state_dict())
    assert int(other.step) == mine.step
    assert bool(other.initted)


# --- torch_ema -----------------------------------------------------------------------------------------
def test_torch_ema_both_ways(tmp_path: Path) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    model = make_model(0)
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.8)
    _train(model, 5, peer.update)
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    target = make_model(1)
    ema = from_peer(tmp_path / "peer.pt", target)  # decay read from the file
    # torch_ema counts updates by default: min(decay, (1 + n) / (10 + n))
    assert repr(ema.schedules[0]) == "num_updates(decay=0.8)"
    averaged = ema.averaged_state_dict()
    for (name, _), shadow in zip(target.named_parameters(), peer.shadow_params):
        assert torch.equal(averaged[name], shadow), name
    assert ema.step == peer.num_updates

    mine = _polyak_trained()
    _differs(mine)
    export(tmp_path / "mine.pt", mine, format="torch_ema")
    other = torch_ema.ExponentialMovingAverage(make_model(4).parameters(), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "mine.pt", weights_only=True))
    averaged = mine.averaged_state_dict()
    for (name, _), shadow in zip(mine.model.named_parameters(), other.shadow_params):
        assert torch.equal(shadow, averaged[name]), name
    assert other.decay == 0.8
    assert other.num_updates is None  # a constant decay: torch_ema's use_num_updates=False


def test_torch_ema_wrong_model_is_named(tmp_path: Path) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    peer = torch_ema.ExponentialMovingAverage(make_model(0).parameters(), decay=0.8)
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    with pytest.raises(ValueError, match="holds 6 shadow parameters but the model has 4"):
        from_peer(tmp_path / "peer.pt", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), decay=0.8)


# --- diffusers -----------------------------------------------------------------------------------------
def test_diffusers_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    model = make_model(0)
    peer = EMAModel(model.parameters(), decay=0.8, min_decay=0.0, use_ema_warmup=False)
    _train(model, 5, lambda: peer.step(model.parameters()))
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    target = make_model(1)
    ema = from_peer(tmp_path / "peer.pt", target, decay=0.8)
    averaged = ema.averaged_state_dict()
    for (name, _), shadow in zip(target.named_parameters(), peer.shadow_params):
        assert torch.equal(averaged[name], shadow), name
    assert ema.step == peer.optimization_step == 5

    mine = _polyak_trained()
    _differs(mine)
    export(tmp_path / "mine.pt", mine, format="diffusers")
    other = EMAModel(make_model(4).parameters(), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "mine.pt", weights_only=True))
    averaged = mine.averaged_state_dict()
    for (name, _), shadow in zip(mine.model.named_parameters(), other.shadow_params):
        assert torch.equal(shadow, averaged[name]), name
    assert other.optimization_step == mine.step


# --- AveragedModel -------------------------------------------------------------------------------------
def test_averaged_model_both_ways(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model(0)
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    _train(model, 5, lambda: peer.update_parameters(model))
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    ema = from_peer(tmp_path / "peer.pt", make_model(1), decay=0.8)
    _assert_same(ema.averaged_state_dict(), peer.module.state_dict(), floats_only=True)
    assert ema.step == int(peer.n_averaged)

    mine = _polyak_trained()
    _differs(mine)
    export(tmp_path / "mine.pt", mine, format="averaged_model")
    other = AveragedModel(make_model(4))
    other.load_state_dict(torch.load(tmp_path / "mine.pt", weights_only=True))
    _assert_same(other.module.state_dict(), mine.averaged_state_dict())
    assert int(other.n_averaged) == mine.step


# --- Ultralytics ---------------------------------------------------------------------------------------
def test_ultralytics_needs_trust_and_round_trips(tmp_path: Path) -> None:
    model_ema_cls = ultralytics_model_ema()
    if model_ema_cls is None:
        pytest.skip("ultralytics not installed")
    model = make_model(0)
    peer = model_ema_cls(model, decay=0.8, tau=2)
    _train(model, 5, lambda: peer.update(model))
    # what Ultralytics' trainer saves: the averaged model itself, pickled in half precision
    torch.save(
        {"epoch": 0, "model": None, "ema": deepcopy(peer.ema).half(), "updates": peer.updates}, tmp_path / "u.pt"
    )
    with pytest.raises(ValueError, match="trust_pickle=True"):
        from_peer(tmp_path / "u.pt", make_model(1), decay=0.8)
    ema = from_peer(tmp_path / "u.pt", make_model(1), decay=0.8, trust_pickle=True)
    expected = {k: v.half() if v.is_floating_point() else v for k, v in peer.ema.state_dict().items()}
    _assert_same(ema.averaged_state_dict(), expected, floats_only=True)
    assert ema.step == peer.updates == 5

    mine = _polyak_trained()
    export(tmp_path / "mine.pt", mine, format="ultralytics")
    ckpt = torch.load(tmp_path / "mine.pt", weights_only=False)  # what the trainer does on resume
    other = model_ema_cls(make_model(4))
    other.ema.load_state_dict(ckpt["ema"].float().state_dict())
    other.updates = ckpt["updates"]
    _assert_same(other.ema.state_dict(), mine.averaged_state_dict())
    assert other.updates == mine.step
