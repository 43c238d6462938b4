"""polyak.update_bn: same numbers as torch.optim.swa_utils.update_bn, and nothing of the live model lost."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

from polyak import EMA, update_bn


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.3), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)
    )


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, generator=g) * 3 + 1 for _ in range(n)]


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def warm(model: nn.Module) -> None:
    model.train()
    for x in batches(3, seed=7):
        model(x)


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "list"])
def test_equals_torch_swa_update_bn(wrap: str) -> None:
    ours, theirs = bn_net(), bn_net()
    warm(ours)
    warm(theirs)
    data = batches()
    if wrap == "tuple":
        loader: list = [(x, torch.zeros(16)) for x in data]
    elif wrap == "list":
        loader = [[x, torch.zeros(16)] for x in data]
    else:
        loader = data
    assert update_bn(loader, ours) == len(data)
    torch_update_bn(loader, theirs)
    a, b = bn_state(ours), bn_state(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and both are the exact statistics of the data: the cumulative average of per-batch statistics
    hidden = [ours[0](x) for x in data]
    torch.testing.assert_close(ours[1].running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0))
    torch.testing.assert_close(ours[1].running_var, torch.stack([h.var(0) for h in hidden]).mean(0))
    assert int(ours[1].num_batches_tracked) == len(data)


def test_dict_batches_and_custom_forward() -> None:
    reference = bn_net()
    data = batches()
    update_bn(data, reference)
    for key in ("input", "x", "inputs"):
        model = bn_net()
        update_bn([{key: x, "label": 0} for x in data], model)
        for k, v in bn_state(model).items():
            assert torch.equal(v, bn_state(reference)[k]), (key, k)
    model = bn_net()
    update_bn([{"features": x} for x in data], model, forward=lambda m, b: m(b["features"]))
    for k, v in bn_state(model).items():
        assert torch.equal(v, bn_state(reference)[k]), k
    with pytest.raises(ValueError, match=r"cannot tell the input from a batch with keys \['features'\]"):
        update_bn([{"features": x} for x in data], bn_net())


def test_num_batches_stops_early() -> None:
    reference, model = bn_net(), bn_net()
    data = batches(5)
    update_bn(data[:2], reference)
    assert update_bn(data, model, num_batches=2) == 2
    for k, v in bn_state(model).items():
        assert torch.equal(v, bn_state(reference)[k]), k
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches must be a positive int"):
            update_bn(data, model, num_batches=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("buffers", ["average", "copy", "skip"])
def test_live_statistics_restored_after_apply(buffers: str) -> None:
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = EMA(model, decay=0.8, buffers=buffers)  # type: ignore[arg-type]
    for x in batches(6, seed=3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches()
    with ema.apply():
        update_bn(data, model)
        inside = bn_state(model)
    # inside the block the statistics were those of the averaged weights on `data`
    check = bn_net(seed=9)
    check.load_state_dict(ema.averaged_state_dict(), strict=False)
    update_bn(data, check)
    for k, v in bn_state(check).items():
        assert torch.equal(inside[k], v), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_momentum_and_modes_restored() -> None:
    model = bn_net()
    model.eval()
    model[4].train()  # a mixed-mode model: each module keeps its own mode
    update_bn(batches(), model)
    assert [m.training for m in model] == [False, False, False, False, True, False]
    assert model[1].momentum == 0.3
    assert model[4].momentum == 0.1
    model.train()
    update_bn(batches(), model)
    assert all(m.training for m in model.modules())


def test_empty_loader_raises_and_leaves_statistics_unchanged() -> None:
    model = bn_net()
    warm(model)
    model.eval()
    before = bn_state(model)
    with pytest.raises(ValueError, match="the loader yielded no batch"):
        update_bn([], model)
    for k, v in bn_state(model).items():
        assert torch.equal(v, before[k]), k
    assert model[1].momentum == 0.3
    assert not model.training


def test_model_without_batchnorm_runs_nothing() -> None:
    calls = []
    model = nn.Linear(4, 2)
    model.register_forward_hook(lambda *_: calls.append(1))
    assert update_bn(batches(), model) == 0
    assert calls == []


def test_device_argument_moves_batches() -> None:
    model = bn_net()
    data = [(x.double(),) for x in batches()]
    model.double()
    assert update_bn(data, model, device="cpu") == 4
