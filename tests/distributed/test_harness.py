"""The harness itself: ranks see their own rank, collectives work, and a failing rank fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import requires_distributed, run_world


def _sum_of_ranks(rank: int, world: int, offset: int) -> dict[str, object]:
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t.item(), "threads": torch.get_num_threads()}


def _fails_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")


@requires_distributed
def test_every_rank_runs_and_reports_in_rank_order(tmp_path: Path) -> None:
    results = run_world(_sum_of_ranks, 2, tmp_path, 10)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 21.0 and r["world"] == 2 and r["threads"] == 1 for r in results)


@requires_distributed
def test_an_exception_on_one_rank_fails_with_its_message(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="rank one says no"):
        run_world(_fails_on_rank_one, 2, tmp_path)
