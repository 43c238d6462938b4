"""Sharded averaging: per-rank shadow memory, update time and collectives per update, world sizes 1, 2, 4.

One model (``--width`` x ``--width`` Linear layers, ``--layers`` of them, and a 5-output head so that
shards are uneven), spawned on ``world`` CPU processes (gloo, file store, one torch thread per rank).
Designs, each measured in the same spawned run:

* ``replicated``: ``polyak.EMA`` of a DDP model: every rank keeps a full fp32 copy of every average;
* ``gather per update``: the model sharded by FSDP2 (``fully_shard`` per Linear and at the root); each
  update all-gathers every parameter (``DTensor.full_tensor()``) and lerps a full fp32 copy on every rank:
  what diffusers' ``EMAModel`` under ZeRO-3, Composer's EMA and the open Lightning FSDP pull request do;
* ``polyak FSDP2``: ``polyak.EMA`` of the same FSDP2 model: each rank averages its local shards;
* ``polyak DDP shard``: ``polyak.EMA(ddp_model, shard=True)``: each rank keeps ``ceil(n / world)``
  elements of each flat shadow group.

A design the installed polyak does not support yet is reported as unavailable, with the error.

Measured per rank: shadow bytes (the averages the design keeps on that rank: local parts of DTensors),
median update time over ``--rounds`` rounds (designs in a shuffled order that every rank shares, a barrier
before each timed update so that the ranks start together), and the collectives one update issues
(``torch.distributed.tensor.debug.CommDebugMode``, which counts DTensor and c10d collectives). Reported:
the largest per-rank value over the ranks, and each design's ratio to ``replicated`` measured in the same
rounds (``time_ratio``: median over rounds of that round's time over the replicated update's time).

Several processes share the CPU cores of this machine (with more ranks than cores they take turns), so
read the memory, the collective counts and the ratios, not the milliseconds.

``--nonfinite ignore`` turns off polyak's NaN check (default ``raise``: every update checks the weights
it reads), for all three polyak rows.

Usage: python benchmarks/bench_sharded.py [--worlds 1,2,4] [--layers 4] [--width 2048] [--rounds 10]
       [--nonfinite raise] [--json benchmarks/results/sharded.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

DECAY = 0.999
DESIGNS = ("replicated", "gather per update", "polyak FSDP2", "polyak DDP shard")


def build_model(layers: int, width: int) -> nn.Sequential:
    """``layers`` Linear(width, width) and a Linear(width, 5) head, the same weights on every rank."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Linear(width, width) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, 5))


def local_part(t: Tensor) -> Tensor:
    """What this rank stores of an averaged tensor: a DTensor's local shard, the ``local`` range of a
    rank slice (``EMA(shard=True)``, shaped like the full tensor but holding only its range), or a plain
    tensor itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to_local()
    local = getattr(t, "local", None)
    return local if isinstance(local, Tensor) else t


def state_bytes(ema: Any) -> int:
    """Bytes of the averages an EMA keeps on this rank (its state dict's averages: local shards only)."""
    state = ema.state_dict()
    return sum(local_part(t).numel() * local_part(t).element_size() for avg in state["averages"] for t in avg.values())


class GatherPerUpdate:
    """The gather-per-update design: every update all-gathers every parameter and lerps a full copy."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters()]
        self.shadows = [self._full(p).detach().float().clone() for p in self.params]

    @staticmethod
    def _full(p: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return p.full_tensor() if isinstance(p, DTensor) else p

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadows, self.params):
            shadow.lerp_(self._full(p).float(), 1 - DECAY)

    def shadow_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadows)

    @torch.no_grad()
    def swap(self) -> None:
        """Write the averages into the live shards and back, as an evaluation swap does (each rank cuts its
        shard from its full copy: no collective)."""
        for shadow, p in zip(self.shadows, self.params):
            local = local_part(p)
            backup = local.clone()
            local.copy_(self._part(shadow, p))
            local.copy_(backup)

    @staticmethod
    def _part(full: Tensor, p: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(p, DTensor):
            return full
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def make_designs(world: int, layers: int, width: int, nonfinite: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Each design's ``(update, shadow_bytes)``, and the designs this polyak cannot build (name -> error)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import polyak

    ddp = nn.parallel.DistributedDataParallel(build_model(layers, width))
    sharded = build_model(layers, width)
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    designs: dict[str, Any] = {}
    missing: dict[str, str] = {}
    replicated = polyak.EMA(ddp, decay=DECAY, nonfinite=nonfinite)
    designs["replicated"] = (replicated.update, state_bytes(replicated), swap(replicated))
    gather = GatherPerUpdate(sharded)
    designs["gather per update"] = (gather.update, gather.shadow_bytes(), gather.swap)
    builders: dict[str, Callable[[], Any]] = {
        "polyak FSDP2": lambda: polyak.EMA(sharded, decay=DECAY, nonfinite=nonfinite),
        "polyak DDP shard": lambda: polyak.EMA(ddp, decay=DECAY, shard=True, nonfinite=nonfinite),
    }
    for name, make in builders.items():
        try:
            ema = make()
        except (TypeError, ValueError) as error:  # this polyak has no such path yet
            missing[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            continue
        designs[name] = (ema.update, state_bytes(ema), swap(ema))
    return designs, missing


def swap(ema: Any) -> Callable[[], None]:
    """Enter and leave ``ema.apply()`` (the evaluation swap), with no forward inside."""

    def run() -> None:
        with ema.apply():
            pass

    return run


def count_collectives(update: Callable[[], None]) -> dict[str, int]:
    """The collectives one call of ``update`` issues, by operation (CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    comm = CommDebugMode()
    with comm:
        update()
    return {str(op): int(n) for op, n in comm.get_comm_counts().items() if n}


def rank_main(
    rank: int, world: int, store: str, out: str, layers: int, width: int, rounds: int, nonfinite: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_grad_enabled(False)
        designs, missing = make_designs(world, layers, width, nonfinite)
        names = list(designs)
        collectives, swap_collectives = {}, {}
        for name in names:  # warm-up (first-touch, lazy state), then one update counted
            designs[name][0]()
            dist.barrier()
            collectives[name] = count_collectives(designs[name][0])
            dist.barrier()
            swap_collectives[name] = count_collectives(designs[name][2])
            dist.barrier()
        times: dict[str, list[float]] = {n: [] for n in names}
        order = random.Random(1)  # the same seed on every rank: every rank runs the designs in one order
        for _ in range(rounds):
            order.shuffle(names)
            for name in names:
                dist.barrier()
                t0 = time.perf_counter()
                designs[name][0]()
                times[name].append(time.perf_counter() - t0)
        result = {
            "rank": rank,
            "shadow_bytes": {n: designs[n][1] for n in designs},
            "times": times,
            "collectives": collectives,
            "swap_collectives": swap_collectives,
            "missing": missing,
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, layers: int, width: int, rounds: int, nonfinite: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(rank_main, args=(world, store, tmp, layers, width, rounds, nonfinite), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    names = list(ranks[0]["shadow_bytes"])
    rows: dict[str, Any] = {}
    for name in names:
        per_rank_ms = [1e3 * statistics.median(r["times"][name]) for r in ranks]
        ratios = [  # per round, the slowest rank's time over the slowest rank's replicated time
            max(r["times"][name][i] for r in ranks) / max(r["times"]["replicated"][i] for r in ranks)
            for i in range(rounds)
        ]
        rows[name] = {
            "shadow_bytes_per_rank": max(r["shadow_bytes"][name] for r in ranks),
            "update_ms_per_rank": max(per_rank_ms),
            "update_ms_by_rank": per_rank_ms,
            "time_ratio_to_replicated": statistics.median(ratios),
            "collectives_per_update": ranks[0]["collectives"][name],
            "collectives_per_swap": ranks[0]["swap_collectives"][name],
        }
    replicated = rows["replicated"]["shadow_bytes_per_rank"]
    for row in rows.values():
        row["memory_ratio_to_replicated"] = row["shadow_bytes_per_rank"] / replicated
    return {"world": world, "designs": rows, "unavailable": ranks[0]["missing"]}


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {op.split('.')[-1]}" for op, n in counts.items()) if counts else "0"


def table(report: dict[str, Any]) -> str:
    lines = [
        "| world | design | shadow MB / rank | × replicated | update ms / rank | × replicated | collectives / update "
        "| collectives / swap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["worlds"]:
        for name in DESIGNS:
            row = entry["designs"].get(name)
            if row is None:
                continue
            comm, swap_comm = (describe(row[k]) for k in ("collectives_per_update", "collectives_per_swap"))
            lines.append(
                f"| {entry['world']} | {name} | {row['shadow_bytes_per_rank'] / 2**20:.1f} | "
                f"{row['memory_ratio_to_replicated']:.2f} | {row['update_ms_per_rank']:.1f} | "
                f"{row['time_ratio_to_replicated']:.2f} | {comm} | {swap_comm} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--nonfinite", default="raise", choices=["raise", "ignore"], help="polyak's NaN check (default: raise)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    model = build_model(args.layers, args.width)
    params = sum(p.numel() for p in model.parameters())
    del model
    report: dict[str, Any] = {
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads_per_rank": 1,
            "backend": "gloo",
        },
        "model": {"layers": args.layers, "width": args.width, "params": params, "fp32_bytes": 4 * params},
        "decay": DECAY,
        "nonfinite": args.nonfinite,
        "rounds": args.rounds,
        "worlds": [],
    }
    for world in (int(w) for w in args.worlds.split(",")):
        entry = run_world(world, args.layers, args.width, args.rounds, args.nonfinite)
        report["worlds"].append(entry)
        for name, error in entry["unavailable"].items():
            print(f"world {world}: {name} unavailable in this polyak ({error})")
    print(f"\nmodel: {params / 1e6:.1f}M params ({4 * params / 2**20:.0f} MB fp32), {args.rounds} rounds\n")
    print(table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
