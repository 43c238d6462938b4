"""DistributedDataParallel on CPU (gloo, 2 processes): every rank keeps the same average, its state dict
has no ``module.`` prefix, and it equals a single-process run on the whole batch.

DDP averages the gradients over the ranks, so with equal shards and a mean loss each rank's step equals
the full-batch step (up to the order of the all-reduce sum): the EMA of each rank must track that too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import polyak
from tests.distributed.harness import requires_distributed, run_world

WORLD = 2
STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8 * WORLD, 6, generator=gen), torch.randn(STEPS, 8 * WORLD, 3, generator=gen)


def _train(model: nn.Module, ema: polyak.EMA, rank: int | None) -> None:
    xs, ys = _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = xs[step], ys[step]
        if rank is not None:  # this rank's shard of the global batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.update()


def _ddp_run(rank: int, world: int) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(_model())
    ema = polyak.EMA(model, decay=0.8)
    _train(model, ema, rank)
    return ema.state_dict()


@requires_distributed
def test_each_ddp_rank_averages_like_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    states = run_world(_ddp_run, WORLD, tmp_path)
    averages = [s["averages"][0] for s in states]
    assert sorted(averages[0]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix
    for key in averages[0]:  # DDP keeps the parameters equal on every rank, so the averages are too
        assert torch.equal(averages[0][key], averages[1][key]), key

    model = _model()
    reference = polyak.EMA(model, decay=0.8)
    _train(model, reference, rank=None)
    for key, expected in reference.averaged_state_dict().items():  # up to the all-reduce's summation order
        torch.testing.assert_close(averages[0][key], expected, rtol=1e-5, atol=1e-6)

    plain = polyak.EMA(_model(), decay=0.8)
    plain.load_state_dict(states[0])  # a DDP rank's state loads into an EMA of the plain model
    assert plain.step == STEPS
    for key, value in plain.averaged_state_dict().items():
        assert torch.equal(value, averages[0][key]), key


def _fsdp2_run(rank: int, world: int) -> list[str]:
    from torch.distributed.fsdp import fully_shard

    from tests.distributed.harness import mesh_1d

    errors: list[str] = []
    mesh = mesh_1d(world)
    sharded = fully_shard(_model(), mesh=mesh)
    polyak.EMA(sharded, decay=0.8)  # after fully_shard: each rank averages its DTensor shards
    model = _model()
    ema = polyak.EMA(model, decay=0.8)
    fully_shard(model, mesh=mesh)  # swaps every parameter behind the registration hooks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    opt.step()
    try:
        ema.update()
    except ValueError as exc:
        errors.append(str(exc))
    return errors


@requires_distributed
def test_fsdp2_sharded_parameters_are_averaged_and_a_later_fully_shard_is_caught(tmp_path: Path) -> None:
    errors = run_world(_fsdp2_run, WORLD, tmp_path)[0]
    assert len(errors) == 1
    # not averaging frozen copies
    assert "parameter '0.weight' became a DTensor" in errors[0]
    assert "Build the EMA after sharding the model" in errors[0]
