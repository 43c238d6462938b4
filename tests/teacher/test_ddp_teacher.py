"""A Teacher of a DDP student (gloo, 2 CPU processes): paired by name through the ``module.`` prefix, the
same on every rank, equal to one process on the whole batch, and its checkpoint loads into a teacher of
the plain student. A sharded (FSDP2) student is refused with a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import polyak

WORLD = 2
STEPS = 6


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(student: nn.Module, teacher: polyak.Teacher, rank: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(STEPS, 8 * WORLD, 6, generator=gen), torch.randn(STEPS, 8 * WORLD, 3, generator=gen)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    teacher.attach(opt)
    for step in range(STEPS):
        x, y = xs[step], ys[step]
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(student(x), y).backward()
        opt.step()


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        student = nn.parallel.DistributedDataParallel(_student())
        teacher = polyak.Teacher(student, momentum=0.8)  # built after wrapping: every rank starts alike
        assert isinstance(teacher.module, nn.Sequential)
        _train(student, teacher, rank)
        torch.save(teacher.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        errors = []
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            polyak.Teacher(fully_shard(_student(), mesh=init_device_mesh("cpu", (WORLD,))))
        except ValueError as exc:
            errors.append(str(exc))
        if rank == 0:
            Path(out, "errors.txt").write_text("\n".join(errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_teacher_pairs_by_name_and_matches_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert sorted(k for k in states[0] if k.startswith("average.")) == [
        "average.0.bias",
        "average.0.weight",
        "average.2.bias",
        "average.2.weight",
    ]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    student = _student()
    reference = polyak.Teacher(student, momentum=0.8)
    _train(student, reference, rank=None)
    for key, value in reference.state_dict().items():  # up to the all-reduce's summation order
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)

    plain = polyak.Teacher(_student(), momentum=0.8)
    plain.load_state_dict(states[0])
    assert plain.step == STEPS
    errors = (tmp_path / "errors.txt").read_text()
    assert "are DTensors" in errors, errors
    assert "with ema.apply():" in errors, errors
