"""Run a function on every rank of a CPU process group (gloo, file store, one thread per rank).

``run_world(fn, world, tmp_path, *args)`` spawns ``world`` processes; rank ``r`` calls ``fn(rank, world,
*args)`` inside an initialised gloo group and returns a picklable result (tensors, dicts, strings); the
results come back in rank order. An exception on any rank fails the test with that rank's traceback.
``fn`` must be a module-level function (the processes are started with ``spawn``). Put many assertions in
one run: starting a world costs a few seconds per process on a 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

requires_distributed = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _entry(rank: int, fn: Callable[..., Any], world: int, store: str, out: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world: int, tmp_path: Path, *args: Any) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each computed on its own rank."""
    out = tmp_path / f"world{world}-{fn.__name__}"
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    if store.exists():
        store.unlink()
    mp.spawn(_entry, args=(fn, world, str(store), str(out), args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def mesh_1d(world: int) -> Any:
    """``init_device_mesh("cpu", (world,))``: the mesh FSDP2 and DTensor tests shard over."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))
