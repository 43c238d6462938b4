"""Round trips with every peer, both ways, and training continued in the peer.

Import: the peer averages n steps and saves; polyak builds its EMA from that file; then the peer and
polyak both follow the same m further weight updates and must hold the same average. Export: polyak
averages n steps and exports; the peer loads the file into a fresh object of its own; both continue m
steps and must agree. A file that carries the wrong counter or schedule (a diffusers
``update_after_step`` off by one, torch_ema's update count dropped) makes the two drift apart by far
more than the tolerance, which only absorbs the peers' own arithmetic (``s - (1 - d) * (s - w)`` in
place of ``lerp``).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import polyak
from polyak import schedules
from polyak.io import export, from_peer
from tests.peers import timm_model_ema, ultralytics_model_ema

pytestmark = pytest.mark.peers

N, M = 6, 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _walk(model: nn.Module, steps: int, seed: int, *after: Callable[[], None]) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        for fn in after:
            fn()


def _assert_close(peer_params: dict[str, torch.Tensor], ema: polyak.EMA) -> None:
    ours = ema.averaged_state_dict()
    for name, value in peer_params.items():
        torch.testing.assert_close(ours[name], value.float(), rtol=1e-5, atol=1e-5, msg=name)
    live = dict(ema.model.named_parameters())
    assert any(not torch.equal(ours[n], live[n]) for n in peer_params), "the average must differ from the weights"


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


def _shadow_params(model: nn.Module, shadows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: s for (n, _), s in zip(model.named_parameters(), shadows, strict=True)}


# --- torch_ema ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema_to_polyak_and_on(tmp_path: Path, use_num_updates: bool) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    model = _model()
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.8, use_num_updates=use_num_updates)
    _walk(model, N, 1, peer.update)
    torch.save(peer.state_dict(), tmp_path / "p.pt")
    ema = from_peer(tmp_path / "p.pt", model)  # the schedule comes from the file
    _walk(model, M, 2, peer.update, ema.update)
    _assert_close(_shadow_params(model, peer.shadow_params), ema)


@pytest.mark.parametrize("decay", [schedules.constant(0.8), schedules.num_updates(0.8)], ids=repr)
def test_polyak_to_torch_ema_and_on(tmp_path: Path, decay: Any) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    model = _model()
    ema = polyak.EMA(model, decay=decay)
    _walk(model, N, 1, ema.update)
    export(tmp_path / "p.pt", ema, format="torch_ema")
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.5)
    peer.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    _walk(model, M, 2, peer.update, ema.update)
    _assert_close(_shadow_params(model, peer.shadow_params), ema)


# --- diffusers ------------------------------------------------------------------------------------------
DIFFUSERS_SETTINGS = [
    {"decay": 0.8},  # diffusers' defaults: update_after_step=0, no warm-up: min(d, (1 + t) / (10 + t))
    {"decay": 0.8, "update_after_step": 2, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 2 / 3},
    {"decay": 0.9, "update_after_step": 0, "use_ema_warmup": True, "inv_gamma": 0.5, "power": 0.75, "min_decay": 0.1},
]


@pytest.mark.parametrize("settings", DIFFUSERS_SETTINGS, ids=["default", "warmup", "warmup-min"])
def test_diffusers_to_polyak_and_on(tmp_path: Path, settings: dict[str, Any]) -> None:
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    model = _model()
    peer = EMAModel(model.parameters(), **settings)
    _walk(model, N, 1, lambda: peer.step(model.parameters()))
    torch.save(peer.state_dict(), tmp_path / "p.pt")
    ema = from_peer(tmp_path / "p.pt", model)  # schedule and start_step from the file
    _walk(model, M, 2, lambda: peer.step(model.parameters()), ema.update)
    _assert_close(_shadow_params(model, peer.shadow_params), ema)


@pytest.mark.parametrize(
    ("decay", "start_step"),
    [
        (schedules.constant(0.8), 0),
        (schedules.num_updates(0.8), 0),
        (schedules.num_updates(0.8), 3),
        (schedules.inverse_gamma(0.8, 1.0, 2 / 3), 2),
    ],
    ids=["constant", "num_updates", "num_updates-start3", "inverse_gamma-start2"],
)
def test_polyak_to_diffusers_and_on(tmp_path: Path, decay: Any, start_step: int) -> None:
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    model = _model()
    ema = polyak.EMA(model, decay=decay, start_step=start_step)
    _walk(model, 2, 1, ema.update)  # still inside the copy phase for start_step=3: the counter must carry it
    export(tmp_path / "p.pt", ema, format="diffusers")
    peer = EMAModel(model.parameters(), decay=0.5)
    peer.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    _walk(model, M, 2, lambda: peer.step(model.parameters()), ema.update)
    _assert_close(_shadow_params(model, peer.shadow_params), ema)


def test_export_refuses_a_schedule_the_peer_cannot_follow(tmp_path: Path) -> None:
    ema = polyak.EMA(_model(), decay=schedules.ultralytics(0.8, tau=3))
    with pytest.raises(ValueError, match="diffusers cannot continue on the schedule"):
        export(tmp_path / "p.pt", ema, format="diffusers")
    with pytest.raises(ValueError, match="update_every=2"):
        export(tmp_path / "p.pt", polyak.EMA(_model(), decay=0.8, update_every=2), format="torch_ema")
    assert not (tmp_path / "p.pt").exists()


# --- ema-pytorch ----------------------------------------------------------------------------------------
EMA_PYTORCH = {"beta": 0.8, "update_after_step": 2, "update_every": 1, "inv_gamma": 1.0, "power": 2 / 3}


def _ema_pytorch_polyak_settings() -> dict[str, Any]:
    # ema-pytorch copies on its first update and through step update_after_step, then decays with
    # clamp(1 - (1 + t / inv_gamma) ** -power, min_value, beta), t = step - update_after_step - 1
    return {"decay": schedules.inverse_gamma(0.8, 1.0, 2 / 3), "start_step": EMA_PYTORCH["update_after_step"] + 1}


def test_ema_pytorch_to_polyak_and_on(tmp_path: Path) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = _model()
    peer = ema_pytorch.EMA(model, **EMA_PYTORCH)
    _walk(model, N, 1, peer.update)
    torch.save(peer.state_dict(), tmp_path / "p.pt")
    ema = from_peer(tmp_path / "p.pt", model, **_ema_pytorch_polyak_settings())
    _walk(model, M, 2, peer.update, ema.update)
    _assert_close(_params(peer.ema_model), ema)


def test_polyak_to_ema_pytorch_and_on(tmp_path: Path) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = _model()
    ema = polyak.EMA(model, **_ema_pytorch_polyak_settings())
    _walk(model, N, 1, ema.update)
    export(tmp_path / "p.pt", ema, format="ema_pytorch")
    peer = ema_pytorch.EMA(model, **EMA_PYTORCH)
    peer.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    _walk(model, M, 2, peer.update, ema.update)
    _assert_close(_params(peer.ema_model), ema)


# --- timm -----------------------------------------------------------------------------------------------
def test_timm_both_ways_and_on(tmp_path: Path) -> None:
    timm_ema = timm_model_ema()
    if timm_ema is None:
        pytest.skip("timm not installed")
    model = _model()
    peer = timm_ema.ModelEmaV3(model, decay=0.8)
    _walk(model, N, 1, lambda: peer.update(model))
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": peer.module.state_dict()}, tmp_path / "p.pth")
    ema = from_peer(tmp_path / "p.pth", model, decay=0.8)
    _walk(model, M, 2, lambda: peer.update(model), ema.update)
    _assert_close(_params(peer.module), ema)

    export(tmp_path / "q.pth", ema, format="timm")
    resumed = timm_ema.ModelEmaV3(model, decay=0.8)
    resumed.module.load_state_dict(torch.load(tmp_path / "q.pth", weights_only=True)["state_dict_ema"])
    _walk(model, M, 3, lambda: resumed.update(model), ema.update)
    _assert_close(_params(resumed.module), ema)


# --- AveragedModel --------------------------------------------------------------------------------------
def test_averaged_model_both_ways_and_on(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    model = _model()
    peer = AveragedModel(model)  # the running mean (SWA) = schedules.uniform()
    _walk(model, N, 1, lambda: peer.update_parameters(model))
    torch.save(peer.state_dict(), tmp_path / "p.pt")
    ema = from_peer(tmp_path / "p.pt", model, decay=schedules.uniform())
    _walk(model, M, 2, lambda: peer.update_parameters(model), ema.update)
    _assert_close(_params(peer.module), ema)

    export(tmp_path / "q.pt", ema, format="averaged_model")
    resumed = AveragedModel(deepcopy(model))
    resumed.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    _walk(model, M, 3, lambda: resumed.update_parameters(model), ema.update)
    _assert_close(_params(resumed.module), ema)


def test_averaged_model_export_counts_models_after_the_copy_phase(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    model = _model()
    ema = polyak.EMA(model, decay=schedules.uniform(), start_step=3)
    _walk(model, N, 1, ema.update)
    export(tmp_path / "q.pt", ema, format="averaged_model")
    resumed = AveragedModel(deepcopy(model))
    resumed.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert int(resumed.n_averaged) == N - 3
    _walk(model, M, 3, lambda: resumed.update_parameters(model), ema.update)
    _assert_close(_params(resumed.module), ema)


# --- Ultralytics ----------------------------------------------------------------------------------------
def test_ultralytics_both_ways_and_on(tmp_path: Path) -> None:
    model_ema_cls = ultralytics_model_ema()
    if model_ema_cls is None:
        pytest.skip("ultralytics not installed")
    model = _model()
    peer = model_ema_cls(model, decay=0.8, tau=2)
    _walk(model, N, 1, lambda: peer.update(model))
    torch.save({"ema": deepcopy(peer.ema), "updates": peer.updates, "model": None}, tmp_path / "p.pt")
    ema = from_peer(tmp_path / "p.pt", model, decay=schedules.ultralytics(0.8, tau=2), trust_pickle=True)
    _walk(model, M, 2, lambda: peer.update(model), ema.update)
    _assert_close(_params(peer.ema), ema)

    export(tmp_path / "q.pt", ema, format="ultralytics")
    ckpt = torch.load(tmp_path / "q.pt", weights_only=False)
    resumed = model_ema_cls(model, decay=0.8, tau=2)
    resumed.ema.load_state_dict(ckpt["ema"].state_dict())
    resumed.updates = ckpt["updates"]
    _walk(model, M, 3, lambda: resumed.update(model), ema.update)
    _assert_close(_params(resumed.ema), ema)


def test_from_peer_without_a_stored_or_given_decay_is_refused(tmp_path: Path) -> None:
    """A timm file stores no decay: EMA's default (power-function, t = 1 at the first update: a copy)
    would silently replace the imported average, so from_peer asks for decay= instead."""
    model = nn.Linear(3, 3)
    averaged = {k: v.detach() + 1.0 for k, v in model.state_dict().items()}
    torch.save({"state_dict_ema": averaged}, tmp_path / "timm.pth")
    with pytest.raises(ValueError, match="does not store the decay it was averaged with; pass decay="):
        from_peer(tmp_path / "timm.pth", model)
    ema = from_peer(tmp_path / "timm.pth", model, decay=0.9)
    ema.update()
    expected = 0.9 * averaged["weight"] + 0.1 * model.weight.detach()
    torch.testing.assert_close(ema.averaged_state_dict()["weight"], expected, rtol=1e-6, atol=1e-6)
