"""A Teacher of a DDP student (gloo, 2 CPU processes): paired by name through the ``module.`` prefix, the
same on every rank, equal to one process on the whole batch, and its checkpoint loads into a teacher of
the plain student. A sharded (FSDP2) student is refused with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import polyak
from tests.distributed.harness import mesh_1d, requires_distributed, run_world

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


def _run(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    student = nn.parallel.DistributedDataParallel(_student())
    teacher = polyak.Teacher(student, momentum=0.8)  # built after wrapping: every rank starts alike
    assert isinstance(teacher.module, nn.Sequential)
    _train(student, teacher, rank)
    errors = []
    try:
        polyak.Teacher(fully_shard(_student(), mesh=mesh_1d(world)))
    except ValueError as exc:
        errors.append(str(exc))
    return {"state": teacher.state_dict(), "errors": "\n".join(errors)}


@requires_distributed
def test_ddp_teacher_pairs_by_name_and_matches_one_process(tmp_path: Path) -> None:
    results = run_world(_run, WORLD, tmp_path)
    states = [r["state"] for r in results]
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
    errors = results[0]["errors"]
    assert "are DTensors" in errors, errors
    assert "with ema.apply():" in errors, errors
