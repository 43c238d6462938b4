"""Rank-sharded averages under DDP: per-rank shadow memory and update time for world sizes 1, 2 and 4.

Every rank holds the same model (as DDP's replicas do). Three designs, timed interleaved in the same
rounds on every rank (a shuffled order each round, the same on every rank), all three on the same
weights after one in-place "optimizer step" per round:

* ``replicated``: ``EMA(model)``: every rank keeps the whole average (what DDP users do today);
* ``rank-sharded``: ``EMA(model, shard=True)``: every rank keeps ``ceil(N / world)`` columns of each shadow
  group and averages them from its own copy of the weights, with no collective;
* ``gather-per-update``: the design of the FSDP/ZeRO integrations that gather the full weights for every
  update (diffusers' ``EMAModel`` under ZeRO-3, Composer, Lightning's open FSDP pull request): one
  all-gather of each rank's ``1/world`` of the flat weights into a full buffer, then a full lerp of a full
  shadow on every rank.

Reported per world size: the shadow bytes each rank holds (for ``gather-per-update`` the full shadow
plus the gathered weights, its peak during an update), the collectives one update issues (counted with
``torch.distributed.tensor.debug.CommDebugMode``), the median update time on rank 0 and its ratio to
``replicated`` in the same rounds. The ranks are processes on one machine (gloo over the loopback,
``torch.set_num_threads(1)`` each): on a 2-core CPU, world 4 puts two ranks on a core, so absolute times
there measure contention; the ratios and the memory are what carry over.

With ``nonfinite="raise"`` (the default) both EMAs check every weight for NaN/inf on every rank (the
rank-sharded one too, so that every rank reaches the same verdict without a collective); the
gather-per-update row checks nothing.

Usage: python benchmarks/bench_rank_shard.py [--worlds 1,2,4] [--width 1024] [--layers 4] [--decays 1]
       [--rounds 30] [--nonfinite raise|ignore] [--out benchmarks/results/rank_shard.json]
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
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

import polyak

DESIGNS = ("replicated", "rank-sharded", "gather-per-update")


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


class GatherPerUpdate:
    """The gather-per-update design: each rank owns 1/world of the flat weights (as FSDP/ZeRO-3 would),
    gathers the full weights every update (one all-gather) and lerps a full shadow."""

    def __init__(self, model: nn.Module, decays: list[float]) -> None:
        self.params = list(model.parameters())
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        n = sum(p.numel() for p in self.params)
        self.chunk = -(-n // self.world)
        self.full = torch.zeros(self.chunk * self.world)
        self.local = torch.zeros(self.chunk)
        self.shadow = torch.cat([p.detach().reshape(-1) for p in self.params]).repeat(len(decays), 1)
        self.weights = [1 - d for d in decays]
        self.n = n

    def shard(self) -> None:
        """Cut this rank's part of the weights (what FSDP would hold); not timed."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        lo = min(self.rank * self.chunk, self.n)
        part = flat[lo : lo + self.chunk]
        self.local.zero_()[: part.numel()].copy_(part)

    def update(self) -> None:
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(self.full, self.local)
        for k, w in enumerate(self.weights):
            self.shadow[k].lerp_(self.full[: self.n], w)

    @property
    def bytes(self) -> int:
        return self.shadow.nbytes + self.full.nbytes


def _shadow_bytes(ema: polyak.EMA) -> int:
    return sum(g.flat.nbytes for g in ema._groups)


def _rank(rank: int, world: int, store: str, out: str, args: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        decays = [0.999 - 0.001 * k for k in range(args["decays"])]
        model = _model(args["width"], args["layers"])
        numel = sum(p.numel() for p in model.parameters())
        designs: dict[str, Callable[[], None]] = {}
        memory: dict[str, int] = {}
        replicated = polyak.EMA(model, decay=decays, nonfinite=args["nonfinite"])
        sharded = polyak.EMA(model, decay=decays, nonfinite=args["nonfinite"], shard=True)
        gather = GatherPerUpdate(model, decays)
        designs = {"replicated": replicated.update, "rank-sharded": sharded.update, "gather-per-update": gather.update}
        memory = {
            "replicated": _shadow_bytes(replicated),
            "rank-sharded": _shadow_bytes(sharded),
            "gather-per-update": gather.bytes,
        }
        collectives = {}
        gather.shard()
        for name, fn in designs.items():
            with CommDebugMode() as comm:
                fn()
            collectives[name] = comm.get_total_counts()
        times: dict[str, list[float]] = {name: [] for name in DESIGNS}
        ratios: dict[str, list[float]] = {name: [] for name in DESIGNS}
        order = list(DESIGNS)
        shuffle = random.Random(0)  # the same order on every rank: the gather design is a collective
        g = torch.Generator().manual_seed(1)
        for _ in range(args["rounds"]):
            shuffle.shuffle(order)
            this: dict[str, float] = {}
            with torch.no_grad():  # one "optimizer step" per round: every design averages the same weights
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
            gather.shard()
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                designs[name]()
                this[name] = time.perf_counter() - t0
            for name in DESIGNS:
                times[name].append(this[name])
                ratios[name].append(this[name] / this["replicated"])
        # the rank-sharded average is the replicated one, bit for bit
        full = sharded.averaged_state_dict(full=True)
        ref = replicated.averaged_state_dict()
        equal = all(torch.equal(full[k], ref[k]) for k in ref) if rank == 0 else None
        result = {
            "rank": rank,
            "numel": numel,
            "memory": memory,
            "collectives": collectives,
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "bitwise_equal": equal,
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), tmp, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--decays", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nonfinite", default="raise", choices=["raise", "ignore"])
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    args = {"width": ns.width, "layers": ns.layers, "decays": ns.decays, "rounds": ns.rounds, "nonfinite": ns.nonfinite}
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(
        f"{machine}; model: {ns.layers} x Linear({ns.width}, {ns.width}); K={ns.decays}; "
        f"nonfinite={ns.nonfinite!r}; {ns.rounds} rounds"
    )
    rows = []
    header = f"{'world':>5} {'design':<18} {'shadow MB/rank':>14} {'collectives':>11} {'ms (rank 0)':>11} {'x replicated':>12}"
    print(header)
    for world in (int(w) for w in ns.worlds.split(",")):
        results = run(world, args)
        r0 = results[0]
        for name in DESIGNS:
            row = {
                "world": world,
                "design": name,
                "shadow_bytes_per_rank": max(r["memory"][name] for r in results),
                "collectives_per_update": r0["collectives"][name],
                "median_ms_rank0": r0["median_ms"][name],
                "ratio_to_replicated": r0["ratio"][name],
            }
            rows.append(row)
            print(
                f"{world:>5} {name:<18} {row['shadow_bytes_per_rank'] / 2**20:>14.2f} {row['collectives_per_update']:>11} "
                f"{row['median_ms_rank0']:>11.2f} {row['ratio_to_replicated']:>12.2f}"
            )
        print(f"      rank-sharded average equal to the replicated one bit for bit: {r0['bitwise_equal']}")
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps({"machine": machine, "args": args, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
