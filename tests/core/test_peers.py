"""Differential tests: polyak and the peers' own code, fed the same sequence of weights, agree to 1e-6.

Mapping of the peers' knobs onto polyak's (derived from their source, checked here):
- timm ModelEmaV3(decay, use_warmup, warmup_gamma, warmup_power, update_after_step=A), ema-pytorch
  EMA(beta, update_after_step=A, inv_gamma, power) and diffusers EMAModel(update_after_step=A) copy the
  weights for their first A + 1 updates: polyak ``start_step=A + 1``.
- torch_ema ExponentialMovingAverage(use_num_updates=True): ``schedules.num_updates``.
- Ultralytics ModelEMA(decay, tau): ``schedules.ultralytics``.
- torch.optim.swa_utils.AveragedModel (running mean, first update copies): ``schedules.uniform()``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyak import EMA, schedules
from tests import peers

pytestmark = pytest.mark.peers


def model_with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def perturb(model: nn.Module, g: torch.Generator) -> None:
    """A random walk of every float tensor, buffers included, as training would move them."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(0.1 * torch.randn(t.shape, generator=g))
            if t.dim() == 1 and t is not None and (t >= 0).all():
                t.abs_()  # keep running_var positive


def assert_matches(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], keys) -> None:
    for key in keys:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def param_keys(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters()]


@pytest.mark.parametrize(
    ("warmup", "after", "pass_step"), [(False, 0, False), (False, 3, True), (True, 0, True), (True, 5, True)]
)
def test_timm_model_ema_v3(warmup, after, pass_step):
    timm = peers.timm_model_ema()
    if timm is None:
        pytest.skip("timm is not installed")
    model = model_with_bn()
    theirs = timm.ModelEmaV3(
        model, decay=0.99, use_warmup=warmup, warmup_power=3 / 4, update_after_step=after, foreach=True
    )
    schedule = schedules.inverse_gamma(0.99, 1.0, 3 / 4) if warmup else schedules.constant(0.99)
    # Given a step, V3 copies for steps <= update_after_step + 1 (warm-up or not); without one it never copies.
    ours = EMA(model, decay=schedule, start_step=after + 1 if pass_step else 0)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 61):
        perturb(model, g)
        theirs.update(model, step=step if pass_step else None)
        ours.update()
    assert_matches(ours.averaged_state_dict(), theirs.module.state_dict(), model.state_dict().keys())


@pytest.mark.parametrize("after", [0, 10])
def test_ema_pytorch(after):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = model_with_bn()
    theirs = ema_pytorch.EMA(
        model, beta=0.999, update_after_step=after, update_every=1, power=2 / 3, include_online_model=False
    )
    ours = EMA(model, decay=schedules.inverse_gamma(0.999, 1.0, 2 / 3), start_step=after + 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        perturb(model, g)
        theirs.update()
        ours.update()
    assert_matches(ours.averaged_state_dict(), theirs.ema_model.state_dict(), model.state_dict().keys())


def test_ema_pytorch_update_every_keeps_beta_and_depends_on_k():
    """The peer's pitfall: with update_every=k it applies beta once per k steps, so the same weights give a
    different average for each k. polyak multiplies the decays: k does not matter."""
    ema_pytorch = pytest.importorskip("ema_pytorch")

    def final(k: int, use_polyak: bool) -> torch.Tensor:
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(0.0)
        if use_polyak:
            ema = EMA(model, decay=0.9, update_every=k)
        else:
            ema = ema_pytorch.EMA(model, beta=0.9, update_after_step=0, update_every=k, include_online_model=False)
            ema.update_moving_average = lambda ma, cur, d=None, _e=ema: ema_pytorch.EMA.update_moving_average(
                _e, ma, cur, 0.9
            )  # constant beta, no warm-up: isolate the update_every rule
            ema.update()  # its first call only copies
        with torch.no_grad():
            model.weight.fill_(1.0)
        for _ in range(40):
            ema.update()
        sd = ema.averaged_state_dict() if use_polyak else ema.ema_model.state_dict()
        return sd["weight"].flatten()[0]

    assert final(1, True).item() == pytest.approx(final(10, True).item(), rel=1e-6)
    assert final(1, False).item() == pytest.approx(1 - 0.9**40, rel=1e-6)
    assert final(10, False).item() == pytest.approx(1 - 0.9**4, rel=1e-6)  # 4 updates with beta, not beta**10


def test_torch_ema_num_updates():
    torch_ema = pytest.importorskip("torch_ema")
    model = model_with_bn()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.999, use_num_updates=True)
    ours = EMA(model, decay=schedules.num_updates(0.999))
    g = torch.Generator().manual_seed(2)
    for _ in range(40):
        perturb(model, g)
        theirs.update()
        ours.update()
    shadow = dict(zip(param_keys(model), theirs.shadow_params))
    assert_matches(ours.averaged_state_dict(), shadow, shadow.keys())


def test_ultralytics_model_ema():
    model_ema = peers.ultralytics_model_ema()
    if model_ema is None:
        pytest.skip("ultralytics is not installed")
    model = model_with_bn()
    theirs = model_ema(model, decay=0.9999, tau=20)
    ours = EMA(model, decay=schedules.ultralytics(0.9999, tau=20))
    g = torch.Generator().manual_seed(3)
    for _ in range(80):
        perturb(model, g)
        theirs.update(model)
        ours.update()
    assert_matches(ours.averaged_state_dict(), theirs.ema.state_dict(), model.state_dict().keys())


def test_averaged_model_is_the_uniform_schedule():
    from torch.optim.swa_utils import AveragedModel

    model = model_with_bn()
    theirs = AveragedModel(model)
    ours = EMA(model, decay=schedules.uniform())
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        perturb(model, g)
        theirs.update_parameters(model)
        ours.update()
    swa = {k.removeprefix("module."): v for k, v in theirs.state_dict().items()}
    assert_matches(ours.averaged_state_dict(), swa, param_keys(model))


def test_diffusers_ema_model():
    try:
        from diffusers.training_utils import EMAModel
    except Exception as exc:  # diffusers needs extra packages (huggingface_hub, ...) to import
        pytest.skip(f"diffusers EMAModel cannot be imported here: {type(exc).__name__}")
    model = model_with_bn()
    theirs = EMAModel(model.parameters(), decay=0.999, update_after_step=3, use_ema_warmup=False)
    ours = EMA(model, decay=schedules.num_updates(0.999), start_step=4)
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        perturb(model, g)
        theirs.step(model.parameters())
        ours.update()
    shadow = dict(zip(param_keys(model), theirs.shadow_params))
    assert_matches(ours.averaged_state_dict(), shadow, shadow.keys())
