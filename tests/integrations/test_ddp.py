"""DistributedDataParallel on CPU (gloo, 2 processes): every rank keeps the same average, its state dict
has no ``module.`` prefix, and it equals a single-process run on the whole batch.

DDP averages the gradients over the ranks, so with equal shards and a mean loss each rank's step equals
the full-batch step (up to the order of the all-reduce sum): the EMA of each rank must track that too.
"""

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


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        ema = polyak.EMA(model, decay=0.8)
        _train(model, ema, rank)
        torch.save(ema.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_each_ddp_rank_averages_like_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
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


def _fsdp2_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    errors: list[str] = []
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
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
        if rank == 0:
            Path(out, "errors.txt").write_text("\n".join(errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_sharded_parameters_are_averaged_and_a_later_fully_shard_is_caught(tmp_path: Path) -> None:
    mp.spawn(_fsdp2_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    errors = (tmp_path / "errors.txt").read_text().splitlines()
    assert len(errors) == 1
    # not averaging frozen copies
    assert "parameter '0.weight' became a DTensor" in errors[0]
    assert "Build the EMA after sharding the model" in errors[0]
