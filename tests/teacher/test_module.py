"""``EMA.module()``: the average as a module whose tensors are the shadows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polyak import EMA


class Net(nn.Module):
    built = 0  # how many times __init__ ran

    def __init__(self) -> None:
        super().__init__()
        type(self).built += 1
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x)))) * self.scale


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_tensors_are_the_shadows_and_follow_each_update() -> None:
    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, decay=0.9)
    avg = ema.module()
    assert avg is ema.module()  # built once
    assert not avg.training
    assert all(not p.requires_grad for p in avg.parameters())
    shadows = ema._shadow_views(0)
    for key, tensor in avg.state_dict(keep_vars=True).items():
        if key in shadows:
            assert tensor.data_ptr() == shadows[key].data_ptr(), key
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(16, 4)
    before = avg(x).clone()
    _train_step(model, opt, x)
    ema.update()
    after = avg(x)
    assert not torch.equal(before, after)
    # the same numbers as swapping the average into the live model
    model.eval()
    with ema.apply():
        torch.testing.assert_close(model(x), after, rtol=0, atol=0)


def test_no_second_init_and_no_tensor_copy() -> None:
    model = Net()
    ema = EMA(model)
    built = Net.built
    avg = ema.module()
    assert Net.built == built  # __init__ did not run again
    shadow_bytes = sum(g.flat.numel() * g.flat.element_size() for g in ema._groups)
    ptrs = {t.untyped_storage().data_ptr() for t in avg.state_dict(keep_vars=True).values()}
    shadow_ptrs = {g.flat.untyped_storage().data_ptr() for g in ema._groups}
    live_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}
    assert ptrs <= shadow_ptrs | live_ptrs  # every tensor is a shadow or a live tensor: no new memory
    assert shadow_bytes > 0


def test_tensors_without_an_average() -> None:
    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, exclude="head", buffers="copy")
    avg = ema.module()
    # excluded parameters and "copy" buffers: the live tensors themselves
    assert avg.head.weight.data_ptr() == model.head.weight.data_ptr()
    assert avg.bn.running_mean.data_ptr() == model.bn.running_mean.data_ptr()
    assert avg.bn.num_batches_tracked.data_ptr() == model.bn.num_batches_tracked.data_ptr()
    assert avg.scale.data_ptr() == model.scale.data_ptr()  # non-persistent buffer: shared
    assert not avg.head.weight.requires_grad
    # "skip" buffers: cloned once at build time
    ema2 = EMA(model, buffers="skip")
    avg2 = ema2.module()
    assert avg2.bn.running_mean.data_ptr() != model.bn.running_mean.data_ptr()
    torch.testing.assert_close(avg2.bn.running_mean, model.bn.running_mean)


def test_tied_weights_stay_tied_and_wrappers_are_unwrapped() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(i))

    model = Tied()
    avg = EMA(nn.DataParallel(model)).module()
    assert isinstance(avg, Tied)
    assert avg.out.weight is avg.emb.weight
    assert set(avg.state_dict()) == set(model.state_dict())


def test_compiled_model_and_compiled_module() -> None:
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model)
    ema = EMA(compiled, decay=0.5)
    avg = ema.module()
    assert isinstance(avg, Net)
    x = torch.randn(4, 4)
    fast = torch.compile(avg)
    torch.testing.assert_close(fast(x), avg(x))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    torch.testing.assert_close(fast(x), avg(x))  # the compiled module reads the updated shadows


def test_debias_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="debias"):
        EMA(Net(), debias=True).module()


def test_index_selects_the_average() -> None:
    model = Net()
    ema = EMA(model, decay=[0.5, 0.9])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    a, b = ema.module(0), ema.module(1)
    assert a is not b
    want = copy.deepcopy(model)
    ema.copy_to(want, index=1)
    torch.testing.assert_close(b.fc.weight, want.fc.weight)
    with pytest.raises(ValueError, match="index"):
        ema.module(2)


def test_export_and_a_compiled_teacher() -> None:
    from polyak import Teacher

    torch.manual_seed(0)
    model = Net()
    avg = EMA(model, decay=0.5).module()
    x = torch.randn(3, 4)
    exported = torch.export.export(avg, (x,))
    torch.testing.assert_close(exported.module()(x), avg(x), rtol=0, atol=0)
    teacher = Teacher(model, momentum=0.5)
    compiled = torch.compile(teacher)
    torch.testing.assert_close(compiled(x), teacher(x))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update()
    torch.testing.assert_close(compiled(x), teacher(x))  # the compiled teacher reads the new averages
