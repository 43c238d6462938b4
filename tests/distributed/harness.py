"""Run a function on every rank of a CPU process group (gloo, file store, one thread per rank).

``run_world(fn, world, tmp_path, *args)`` spawns ``world`` processes; rank ``r`` calls ``fn(rank, world,
*args)`` inside an initialised gloo group and returns a picklable result (tensors, dicts, strings); the
results come back in rank order. An exception on any rank fails the test with that rank's traceback.
``fn`` must be a module-level function (the processes are started with ``spawn``). Put many assertions in
one run: starting a world costs a few seconds per process on a 2-core machine.
"""

from __future__ import annotations

import os
import traceback
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
        try:
            result = fn(rank, world, *args)
        except BaseException:
            # the other ranks then fail too (a peer reset in their next collective), and mp.spawn reports
            # whichever process it finds first: keep this rank's own traceback for run_world
            Path(out, f"rank{rank}.error").write_text(traceback.format_exc())
            raise
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
    for stale in out.glob("rank*.error"):
        stale.unlink()
    try:
        mp.spawn(_entry, args=(fn, world, str(store), str(out), args), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:
        raised = sorted(out.glob("rank*.error"))
        if raised:  # the rank whose own code raised, not a peer that lost its connection to it
            raise RuntimeError(f"{raised[0].stem} failed:\n{raised[0].read_text()}") from exc
        raise
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def mesh_1d(world: int) -> Any:
    """``init_device_mesh("cpu", (world,))``: the mesh FSDP2 and DTensor tests shard over."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def collectives(fn: Callable[[], Any]) -> tuple[int, Any]:
    """``(number of collectives fn issued, fn())``, counted with ``CommDebugMode``."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        out = fn()
    return int(comm.get_total_counts()), out
