"""``polyak.Teacher`` against the reference update loops re-implemented from each paper's code, and its
contract: one copy of the weights, paired by name, one update per optimizer step, buffer policies,
nothing reaches an optimizer, the student is never modified, checkpoints resume bitwise."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import Teacher, schedules
from tests.teacher.test_momentum_schedules import (
    DinoV2Reference,
    dino_reference,
    ijepa_reference,
    lightly_reference,
    moco_reference,
)


class Student(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.ReLU())
        self.projector = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def _step(student: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(32, 6, generator=gen)
    opt.zero_grad()
    (student(x) - x.sum(1, keepdim=True)).pow(2).mean().backward()
    opt.step()


@torch.no_grad()
def _dino_update(student: nn.Module, teacher: nn.Module, m: float) -> None:
    # facebookresearch/dino main_dino.py: zip of parameters, mul_(m).add_((1 - m) * param_q)
    for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def _assert_teacher_equals(teacher: Teacher, reference: nn.Module, atol: float = 1e-6) -> None:
    ours = dict(teacher.module.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=atol)


def _run_parity(
    momentum: schedules.TensorSchedule,
    reference_m: Callable[[int], float],
    update: Callable[[nn.Module, nn.Module, float], None],
    *,
    steps: int = 300,
    update_first: bool = False,
) -> None:
    torch.manual_seed(0)
    student = Student()
    reference = copy.deepcopy(student)
    teacher = Teacher(student, momentum=momentum)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for it in range(steps):
        if update_first:  # MoCo v3: the momentum encoder is updated before the forward pass
            update(student, reference, reference_m(it))
            teacher.update()
            assert teacher.momentum == pytest.approx(reference_m(it), abs=1e-15)
        _step(student, opt, gen)
        if not update_first:
            update(student, reference, reference_m(it))
            teacher.update()
    _assert_teacher_equals(teacher, reference)
    assert teacher.step == steps


def test_dino_parity() -> None:
    ref = dino_reference(0.9, 1.0, epochs=10, niter_per_ep=30)  # a low base so the teacher moves
    _run_parity(schedules.dino(300, base=0.9), lambda it: float(ref[it]), _dino_update)


def test_dinov2_parity() -> None:
    ref = DinoV2Reference(0.9, 1.0, 250)
    _run_parity(schedules.dinov2(250, base=0.9), lambda it: ref[it], _dino_update)


def test_moco_v3_parity_with_the_update_before_forward() -> None:
    epochs, ipe = 6, 50

    @torch.no_grad()
    def moco_update(student: nn.Module, teacher: nn.Module, m: float) -> None:
        for param_b, param_m in zip(student.parameters(), teacher.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)  # moco-v3 builder.py

    _run_parity(
        schedules.moco_v3(epochs, ipe, base=0.9),
        lambda it: moco_reference(it // ipe + (it % ipe) / ipe, epochs, 0.9),
        moco_update,
        update_first=True,
    )


def test_lightly_parity() -> None:
    @torch.no_grad()
    def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
        for model_ema_p, model_p in zip(model_ema.parameters(), model.parameters()):
            model_ema_p.data = model_ema_p.data * m + model_p.data * (1.0 - m)  # lightly.models.utils

    _run_parity(
        schedules.lightly_cosine(300, 0.9, 1.0), lambda it: lightly_reference(it, 300, 0.9, 1.0), update_momentum
    )


def test_mean_teacher_parity() -> None:
    @torch.no_grad()
    def update_ema_variables(model: nn.Module, ema_model: nn.Module, alpha: float) -> None:
        for ema_param, param in zip(ema_model.parameters(), model.parameters()):
            ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)  # CuriousAI/mean-teacher

    # global_step is incremented before the call: alpha = min(1 - 1 / (global_step + 1), 0.95)
    _run_parity(schedules.mean_teacher(0.95), lambda it: min(1 - 1 / (it + 2), 0.95), update_ema_variables)


def test_ijepa_parity_with_resume_by_replay() -> None:
    ipe, epochs, start_epoch = 20, 10, 4
    torch.manual_seed(0)
    student = Student()
    reference = copy.deepcopy(student)
    teacher = Teacher(student, momentum=schedules.ijepa(ipe, epochs, start=0.9, end=1.0, ipe_scale=1.25))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    ms = iter(ijepa_reference(ipe, epochs, (0.9, 1.0), 1.25))
    for _ in range(start_epoch * ipe):
        _step(student, opt, gen)
        m = next(ms)
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), reference.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        teacher.update()
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    # resume: a new teacher of a new student, loaded from the checkpoint; the reference replays next()
    student2 = copy.deepcopy(student)
    resumed = Teacher(student2, momentum=schedules.ijepa(ipe, epochs, start=0.9, end=1.0, ipe_scale=1.25))
    resumed.load_state_dict(saved)
    for name, p in teacher.module.named_parameters():
        assert torch.equal(dict(resumed.module.named_parameters())[name], p)  # bitwise
    assert resumed.step == teacher.step
    ms = iter(ijepa_reference(ipe, epochs, (0.9, 1.0), 1.25))
    for _ in range(start_epoch * ipe):
        next(ms)
    opt2 = torch.optim.AdamW(student2.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for _ in range((epochs - start_epoch) * ipe):
        _step(student2, opt2, gen)
        m = next(ms)
        with torch.no_grad():
            for param_q, param_k in zip(student2.parameters(), reference.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        resumed.update()
    _assert_teacher_equals(resumed, reference)


def test_checkpoint_resume_is_bitwise_against_an_uninterrupted_run() -> None:
    torch.manual_seed(0)
    a = Student(bn=True)
    b = copy.deepcopy(a)
    ta = Teacher(a, momentum=schedules.dino(40, base=0.8), buffers="average")
    tb = Teacher(b, momentum=schedules.dino(40, base=0.8), buffers="average")
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        _step(a, oa, ga)
        ta.update()
        _step(b, ob, gb)
        tb.update()
    ckpt = copy.deepcopy(tb.state_dict())
    tb2 = Teacher(b, momentum=schedules.dino(40, base=0.8), buffers="average")
    tb2.load_state_dict(ckpt)
    for _ in range(20):
        _step(a, oa, ga)
        ta.update()
        _step(b, ob, gb)
        tb2.update()
    for (ka, va), (kb, vb) in zip(ta.module.state_dict().items(), tb2.module.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka
    assert ta.momentum == tb2.momentum


def test_load_validates_before_writing() -> None:
    teacher = Teacher(Student(bn=True))
    state = teacher.state_dict()
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    bad = dict(state)
    bad["average.projector.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="projector.weight"):
        teacher.load_state_dict(bad)
    del bad["counters"]
    with pytest.raises(RuntimeError, match="counters"):
        teacher.load_state_dict(bad)
    for k, v in teacher.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_one_copy_of_the_weights_and_aliasing() -> None:
    torch.manual_seed(0)
    student = Student(bn=True)
    teacher = Teacher(student, momentum=0.5, buffers="average")
    shadows = teacher.ema._shadow_views(0)
    extra = 0
    for key, t in teacher.module.state_dict(keep_vars=True).items():
        if key in shadows:
            assert t.data_ptr() == shadows[key].data_ptr()
        else:
            extra += t.numel()
    assert extra == 1  # only num_batches_tracked is the teacher's own (copied each update)
    weights = sum(p.numel() for p in student.parameters()) + 32  # + the averaged BN statistics
    assert sum(g.flat.numel() for g in teacher.ema._groups) == weights  # one extra copy, no more
    x = torch.randn(8, 6)
    out0 = teacher(x)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update()
    assert not torch.equal(out0, teacher(x))


def test_no_teacher_parameter_reaches_an_optimizer() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = Student()
            self.teacher = Teacher(self.student)

    both = Both()
    assert list(both.teacher.parameters()) == []
    assert len(list(both.parameters())) == len(list(both.student.parameters()))
    assert all(not p.requires_grad for p in both.teacher.module.parameters())
    out = both.teacher(torch.randn(4, 6))
    assert not out.requires_grad
    both.to(torch.float64)  # a parent's cast does not detach the teacher from its shadows
    shadows = both.teacher.ema._shadow_views(0)
    assert both.teacher.module.projector.weight.data_ptr() == shadows["projector.weight"].data_ptr()


def test_gradient_accumulation_gives_one_update_per_optimizer_step() -> None:
    torch.manual_seed(0)
    student = Student()
    teacher = Teacher(student, momentum=0.9)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    teacher.attach(opt)
    gen = torch.Generator().manual_seed(0)
    k = 4
    for _ in range(3):
        for _ in range(k):
            x = torch.randn(8, 6, generator=gen)
            (student(x).pow(2).mean() / k).backward()
        opt.step()
        opt.zero_grad()
    assert teacher.step == 3
    with pytest.raises(RuntimeError, match="already attached"):
        teacher.attach(opt)
    teacher.detach()
    opt.step()
    assert teacher.step == 3


class _SkippingScaler:
    """The part of torch.amp.GradScaler's contract the teacher relies on: ``step(optimizer)`` runs
    ``optimizer.step()`` unless the gradients held inf (then it skips it)."""

    def __init__(self) -> None:
        self.skip = False

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.skip:
            optimizer.step()


@pytest.mark.parametrize(("policy", "expected"), [("update", 4), ("skip", 3)])
def test_steps_skipped_by_the_scaler(policy: str, expected: int) -> None:
    student = Student()
    teacher = Teacher(student, momentum=0.9, skipped_steps=policy)  # type: ignore[arg-type]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    scaler = _SkippingScaler()
    teacher.attach(opt, scaler=scaler)
    for skip in (False, True, False, False):
        scaler.skip = skip
        scaler.step(opt)
    assert teacher.step == expected
    teacher.detach()
    scaler.step(opt)
    assert teacher.step == expected
    assert "step" not in vars(scaler)


def test_real_grad_scaler_skip_is_averaged() -> None:
    student = Student()
    teacher = Teacher(student, momentum=0.9)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    teacher.attach(opt, scaler=scaler)
    x = torch.randn(4, 6)
    scaler.scale(student(x).sum() * float("inf")).backward()  # inf gradients: the step is skipped
    before = [p.clone() for p in student.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert teacher.step == 1


@pytest.mark.parametrize("policy", ["own", "average", "copy"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_buffer_policies_and_the_student_is_never_modified(policy: str, mode: str) -> None:
    torch.manual_seed(0)
    student = Student(bn=True)
    student.train()
    teacher = Teacher(student, momentum=0.5, buffers=policy, mode=mode)  # type: ignore[arg-type]
    bn_t = teacher.module.backbone[1]
    bn_s = student.backbone[1]
    start_mean = bn_s.running_mean.clone()
    # a teacher forward never changes the student (in either mode)
    snapshot = copy.deepcopy(student.state_dict())
    teacher(torch.randn(16, 6) + 3.0)
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert teacher.module.training == (mode == "train")
    student(torch.randn(16, 6) * 2 + 1)  # the student's own forward moves its statistics
    snapshot = copy.deepcopy(student.state_dict())
    teacher.update()
    if policy == "own":
        if mode == "eval":
            assert torch.equal(bn_t.running_mean, start_mean)  # never touched by updates
        assert int(bn_t.num_batches_tracked) == (1 if mode == "train" else 0)
    elif policy == "copy":
        assert torch.equal(bn_t.running_mean, bn_s.running_mean)
        assert bn_t.running_mean.data_ptr() != bn_s.running_mean.data_ptr()
    else:  # average: lerp halfway from the teacher's value (moved by its own forward in train mode)
        assert int(bn_t.num_batches_tracked) == int(bn_s.num_batches_tracked)
    teacher.train()  # a parent's train()/eval() does not change the teacher's mode
    assert teacher.module.training == (mode == "train")
    teacher(torch.randn(16, 6) - 2.0)
    teacher.update()
    for k, v in student.state_dict().items():  # neither an update nor a forward writes into the student
        assert torch.equal(v, snapshot[k]), k


def test_average_buffers_follow_the_lerp() -> None:
    torch.manual_seed(0)
    student = Student(bn=True)
    teacher = Teacher(student, momentum=0.25, buffers="average")
    start = student.backbone[1].running_var.clone()
    student(torch.randn(16, 6) * 3)
    teacher.update()
    want = torch.lerp(start, student.backbone[1].running_var, 0.75)
    torch.testing.assert_close(teacher.module.backbone[1].running_var, want)


def test_include_leaves_a_byol_predictor_out() -> None:
    class Online(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Student()
            self.predictor = nn.Linear(8, 8)

    online = Online()
    teacher = Teacher(online, momentum=0.5, include=["encoder"])
    assert all(k.startswith("encoder.") for k in teacher.ema.averaged_keys)
    assert teacher.module.predictor.weight.data_ptr() == online.predictor.weight.data_ptr()  # shared, live
    with pytest.raises(ValueError, match="matched no"):
        Teacher(online, include=["encodr"])


def test_pairs_by_name_under_ddp_prefixes_and_compile() -> None:
    torch.manual_seed(0)
    student = Student()
    wrapped = nn.DataParallel(student)  # keys "module.backbone...", as DDP
    teacher = Teacher(wrapped, momentum=0.5)
    assert isinstance(teacher.module, Student)
    assert "backbone.0.weight" in teacher.ema.averaged_keys
    # a checkpoint of the wrapped teacher loads into a teacher of the plain student
    plain = Teacher(Student(), momentum=0.5)
    plain.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(plain.module.projector.weight, student.projector.weight)
    compiled = Teacher(torch.compile(student), momentum=0.5)
    assert isinstance(compiled.module, Student)


def test_momentum_one_freezes_and_errors_are_clear() -> None:
    student = Student()
    teacher = Teacher(student, momentum=1.0)
    before = teacher.module.projector.weight.clone()
    with torch.no_grad():
        student.projector.weight.add_(1.0)
    teacher.update()
    assert torch.equal(teacher.module.projector.weight, before)
    with pytest.raises(ValueError, match="buffers"):
        Teacher(student, buffers="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        Teacher(student, mode="test")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one momentum"):
        Teacher(student, momentum=[0.9, 0.99])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Teacher(student, momentum=1.5)
    assert math.isclose(teacher.momentum, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    momenta=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_any_momentum_sequence_matches_a_float64_reference(momenta: list[float], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    student = nn.Linear(3, 2)
    teacher = Teacher(student, momentum=lambda t: momenta[t - 1])
    ref = {k: v.detach().to(torch.float64).clone() for k, v in student.named_parameters()}
    for m in momenta:
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 3)
        teacher.update()
        for k, p in student.named_parameters():
            ref[k] = m * ref[k] + (1 - m) * p.detach().to(torch.float64)
    for k, p in teacher.module.named_parameters():
        torch.testing.assert_close(p.to(torch.float64), ref[k], rtol=0, atol=1e-5)
