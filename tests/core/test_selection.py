"""What is averaged: BatchNorm and integer buffers, the buffer policy, include/exclude, tied weights,
wrapper prefixes, and models that deepcopy rejects."""

from __future__ import annotations

import io
import re
import threading

import pytest
import torch
from torch import nn

from polyak import EMA


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 6, 6, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_batchnorm_stats_averaged_and_integer_buffer_copied_exactly():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.5)
    mean0 = model[1].running_mean.clone()
    _train_step(model, opt, 0)
    ema.update()
    sd = ema.averaged_state_dict()
    torch.testing.assert_close(sd["1.running_mean"], 0.5 * mean0 + 0.5 * model[1].running_mean)
    assert sd["1.num_batches_tracked"].dtype == torch.int64
    assert sd["1.num_batches_tracked"].item() == 1
    assert "1.num_batches_tracked" not in ema.averaged_keys
    for _ in range(300):  # an averaged int64 counter would drift or truncate; ours is exact
        _train_step(model, opt, 1)
        ema.update()
    assert ema.averaged_state_dict()["1.num_batches_tracked"].item() == 301


def test_buffer_policy_copy_and_skip():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copy = EMA(model, decay=0.9, buffers="copy")
    skip = EMA(model, decay=0.9, buffers="skip")
    assert not any("running" in k for k in copy.averaged_keys)
    _train_step(model, opt, 0)
    copy.update()
    skip.update()
    assert torch.equal(copy.averaged_state_dict()["1.running_var"], model[1].running_var)
    assert "1.running_var" not in skip.averaged_state_dict()
    target = convnet()
    with torch.no_grad():
        target[1].running_var.fill_(7.0)
    skip.copy_to(target)
    assert torch.all(target[1].running_var == 7.0)  # skipped buffers are left alone
    torch.testing.assert_close(target[4].weight, skip.averaged_state_dict()["4.weight"])


def test_non_persistent_buffers_are_ignored():
    model = nn.Linear(2, 2)
    model.register_buffer("cache", torch.ones(2), persistent=False)
    ema = EMA(model, decay=0.9)
    assert "cache" not in ema.averaged_keys
    assert set(ema.averaged_state_dict()) == set(model.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "averaged"),
    [
        ({"exclude": "*.bias"}, {"0.weight", "1.weight"}),
        ({"exclude": ["0"]}, {"1.weight", "1.bias"}),
        ({"include": re.compile(r"^1\.")}, {"1.weight", "1.bias"}),
        ({"include": ["0.weight", "1.*"], "exclude": "1.bias"}, {"0.weight", "1.weight"}),
    ],
)
def test_include_exclude(kwargs, averaged):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    ema = EMA(model, decay=0.9, **kwargs)
    assert set(ema.averaged_keys) == averaged
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    sd = ema.averaged_state_dict()
    for key, live in model.state_dict().items():
        if key in averaged:
            assert not torch.equal(sd[key], live)
        else:  # excluded parameters are not shadowed: the averaged model uses their live values
            assert torch.equal(sd[key], live)


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"matched no floating parameter.*keys look like"):
        EMA(nn.Linear(2, 2), exclude="encoder.*")


def test_excluding_everything_is_an_error():
    with pytest.raises(ValueError, match="left no parameter to average"):
        EMA(nn.Linear(2, 2), exclude="*")


def test_tied_weights_share_one_shadow():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    ema = EMA(model, decay=0.5)
    assert ema.averaged_keys == ["emb.weight"]
    start = emb.weight.detach().clone()
    with torch.no_grad():
        emb.weight.add_(2.0)
    ema.update()
    expected = start.lerp(start + 2.0, 0.5)
    sd = ema.averaged_state_dict()
    assert set(sd) == {"emb.weight", "head.weight"}
    # every key of the tied tensor holds the average (not the live value under its second name, which
    # load_state_dict would otherwise write last, over the average)
    torch.testing.assert_close(sd["emb.weight"], expected, rtol=0, atol=0)
    torch.testing.assert_close(sd["head.weight"], expected, rtol=0, atol=0)
    model.load_state_dict(sd)
    torch.testing.assert_close(head.weight.detach(), expected, rtol=0, atol=0)


def test_model_that_deepcopy_rejects():
    class WithLock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.lock = threading.Lock()
            self.log = io.StringIO()

    model = WithLock()
    with pytest.raises(TypeError):
        import copy

        copy.deepcopy(model)
    ema = EMA(model, decay=0.9)
    ema.update()
    with ema.apply():
        pass


def test_prefixes_from_dataparallel_and_compile_are_normalised():
    plain = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    wrapped = nn.DataParallel(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    compiled = torch.compile(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    ema_wrapped = EMA(wrapped, decay=0.9)
    ema_compiled = EMA(compiled, decay=0.9)
    ema_plain = EMA(plain, decay=0.9)
    assert (
        ema_wrapped.averaged_keys
        == ema_plain.averaged_keys
        == ema_compiled.averaged_keys
        == [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
        ]
    )
    ema_plain.load_state_dict(ema_wrapped.state_dict())
    ema_compiled.load_state_dict(ema_plain.state_dict())
    ema_wrapped.load_state_dict(ema_compiled.state_dict())
    ema_wrapped.copy_to(plain)
    torch.testing.assert_close(plain[0].weight, wrapped.module[0].weight)
    # averaged_state_dict keeps the wrapped model's own keys, so it loads back into it
    wrapped.load_state_dict(ema_wrapped.averaged_state_dict())
