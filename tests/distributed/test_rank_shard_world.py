"""Rank-sharded shadows on real process groups (gloo, CPU): no collective per update, one all-gather per
group or per tensor to get full values back, and distributed checkpoints that reshard between world
sizes 2 and 3 and load into a plain single-process EMA, bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor.debug import CommDebugMode

from polyak import EMA, _kernels
from polyak._layout import Group
from polyak._rank_shard import (
    FlatRangeShard,
    chunk_range,
    gather_row,
    layouts_of,
    pieces,
    rank_slices,
    scatter_row_,
)
from polyak._readers import Reader, plan_reader
from tests.distributed.harness import requires_distributed, run_world
from tests.distributed.toy import DECAYS
from tests.distributed.toy import Net as _Net


def _replicated(seed: int) -> tuple[nn.Module, EMA]:
    torch.manual_seed(seed)
    model = _Net()
    return model, EMA(model, decay=DECAYS, nonfinite="ignore")


Shard = tuple[Group, Tensor, list[list[Tensor]], list[Tensor], Reader]


def _train(model: nn.Module, ema: EMA, steps: int, shards: list[Shard]) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():  # the same on every rank, as DDP's replicas
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        ema.update()
        weights = [1 - b for b in ema._counters.last_decays]
        for _, local, views, live, reader in shards:
            _kernels.lerp_shadows_(views, local, live, reader.read(), weights, same_dtype=reader.same_dtype)


def _shard(ema: EMA, rank: int, world: int, *, fresh: bool) -> list[Shard]:
    """This rank's columns of each group as a ``(K, m)`` local row in chunk order, a view per piece, the
    live pieces (``RankSlice.local``) and the engine's reader over them."""
    out = []
    for group in ema._groups:
        lo, hi = chunk_range(group.numel, world, rank)
        found = pieces([s.numel() for s in group.sources], group.order, lo, hi)
        slices = rank_slices([s.shape for s in group.sources], group.order, world, rank)
        live = [slices[p.index].local(group.sources[p.index]) for p in found]
        local = torch.zeros_like(group.flat[:, lo:hi]) if fresh else group.flat[:, lo:hi].clone()
        views = [[row[p.offset : p.offset + p.numel] for p in found] for row in local]
        reader = plan_reader(live, group.dtype, group.device, num_averages=len(DECAYS), check=False, force_gather=True)
        out.append((group, local, views, live, reader))
    return out


def _sharded_state(ema: EMA, shards: list[Any], rank: int, world: int) -> dict[str, Any]:
    """A plain EMA's state with each average replaced by this rank's ``FlatRangeShard``s (same keys)."""
    state = ema.state_dict()
    averages: list[dict[str, Tensor]] = [{} for _ in DECAYS]
    for group, local, *_ in shards:
        slices = rank_slices([s.shape for s in group.sources], group.order, world, rank)
        numels = [s.numel() for s in group.sources]
        starts = {}
        pos = 0
        for i in group.order:
            starts[i] = pos
            pos += numels[i]
        lo = chunk_range(group.numel, world, rank)[0]
        for i, (key, sl) in enumerate(zip(group.keys, slices)):
            for k in range(len(DECAYS)):
                a = starts[i] + sl.start - lo
                averages[k][key] = sl.wrap(local[k, a : a + sl.stop - sl.start])
    state["averages"] = averages
    return state


def _world_two(rank: int, world: int, path: str) -> dict[str, Any]:
    model, ema = _replicated(0)
    shards = _shard(ema, rank, world, fresh=False)
    out: dict[str, Any] = {"rank": rank, "numel": ema._groups[0].numel}
    with CommDebugMode() as comm:
        _train(model, ema, 6, shards)
    out["update_collectives"] = comm.get_total_counts()
    # one all-gather per group gives the replicated rows; scattered into the live weights, the averages
    with CommDebugMode() as comm:
        rows = [[gather_row(local[k], g.numel, world) for k in range(len(DECAYS))] for g, local, *_ in shards]
    out["row_collectives"] = comm.get_total_counts()
    out["rows_equal"] = all(torch.equal(r, g.flat[k]) for (g, *_), rs in zip(shards, rows) for k, r in enumerate(rs))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    for (group, *_), rs in zip(shards, rows):
        scatter_row_(rs[1], group.sources, group.order)
    averaged = ema.averaged_state_dict(1)
    out["scattered_equal"] = all(torch.equal(model.state_dict()[k], averaged[k]) for k in averaged)
    model.load_state_dict(live)
    # the layout of each group from the selection alone (as the EMA will build it), and apply's gather:
    # each rank's 1-D pieces of the averages, one all-gather per group, written into the live weights
    layouts = layouts_of(ema._selected, dtype=None, device=None, shard=True)
    out["layouts"] = [
        (lay.numel, lay.order == tuple(g.order), lay.world, lay.rank) for lay, g in zip(layouts, ema._groups)
    ]
    live_by_key = dict(zip(ema._groups[0].keys, ema._groups[0].sources))
    slices = layouts[0].slices()
    out["local_is_stable"] = all(sl.local(live_by_key[k]) is sl.local(live_by_key[k]) for k, sl in slices.items())
    mine = {k: sl.local(averaged[k]).to(torch.float32) for k, sl in slices.items()}
    with CommDebugMode() as comm:
        layouts[0].gather_(mine, live_by_key)
    out["apply_collectives"] = comm.get_total_counts()
    out["applied_equal"] = all(torch.equal(model.state_dict()[k], averaged[k]) for k in averaged)
    model.load_state_dict(live)
    try:
        layouts_of(ema._selected, dtype=None, device=None, shard="yes")
    except TypeError as e:
        out["bad_shard"] = str(e)
    # one full tensor at a time (streaming a state): one all-gather per tensor
    state = _sharded_state(ema, shards, rank, world)
    reference = ema.state_dict()
    with CommDebugMode() as comm:
        fulls = {key: shard.full_tensor() for key, shard in state["averages"][0].items()}
    out["tensor_collectives"] = comm.get_total_counts()
    out["tensors"] = len(fulls)
    out["full_equal"] = all(torch.equal(v, reference["averages"][0][k]) for k, v in fulls.items())
    out["shard_types"] = sorted({type(v).__name__ for a in state["averages"] for v in a.values()})
    dcp.save({"ema": state}, checkpoint_id=path)
    out["reference"] = reference
    return out


def _load(rank: int, world: int, path: str, reference: dict[str, Any]) -> dict[str, Any]:
    _, ema = _replicated(seed=5)  # other weights: everything must come from the checkpoint
    shards = _shard(ema, rank, world, fresh=True)
    state = _sharded_state(ema, shards, rank, world)
    before = [local.clone() for _, local, *_ in shards]
    dcp.load({"ema": state}, checkpoint_id=path)
    out: dict[str, Any] = {"step": state["step"], "products": state["products"]}
    out["changed"] = all(not torch.equal(b, local) for b, (_, local, *_) in zip(before, shards))
    out["locals_equal"] = all(
        torch.equal(shard.local, shard.placement.take(reference["averages"][k][key]))
        for k, average in enumerate(state["averages"])
        for key, shard in average.items()
    )
    out["full_equal"] = all(
        torch.equal(shard.full_tensor(), reference["averages"][k][key])
        for k, average in enumerate(state["averages"])
        for key, shard in average.items()
    )
    return out


def _load_into_plain_ema(path: str, reference: dict[str, Any]) -> None:
    """World size 1, no process group: the checkpoint loads into a plain EMA (its own state dict as DCP's
    ``Stateful``), the same keys and shapes, every average bit for bit."""
    _, ema = _replicated(seed=7)
    with pytest.warns(UserWarning, match="single process"):
        dcp.load({"ema": ema}, checkpoint_id=path, no_dist=True)
    state = ema.state_dict()
    assert state["step"] == reference["step"] == 6
    assert state["products"] == reference["products"]
    assert state["last_decays"] == reference["last_decays"]
    for k in range(len(DECAYS)):
        assert state["averages"][k].keys() == reference["averages"][k].keys()
        for key, value in reference["averages"][k].items():
            assert torch.equal(state["averages"][k][key], value), key


def test_shard_needs_an_initialised_process_group() -> None:
    _, ema = _replicated(0)
    with pytest.raises(ValueError, match="no initialised process group"):
        layouts_of(ema._selected, dtype=None, device=None, shard=True)
    with pytest.raises(TypeError, match="shard must be False, True"):
        layouts_of(ema._selected, dtype=None, device=None, shard=1)


@requires_distributed
def test_world_two_updates_without_collectives_and_gathers_once(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    results = run_world(_world_two, 2, tmp_path, path)
    for r in results:
        assert r["update_collectives"] == 0
        assert r["row_collectives"] == len(DECAYS)  # one all-gather per group (one here) and average
        assert r["rows_equal"]
        assert r["scattered_equal"]
        assert r["layouts"] == [(r["numel"], True, 2, r["rank"])]
        assert r["local_is_stable"]
        assert r["apply_collectives"] == 1
        assert r["applied_equal"]
        assert "shard must be False, True" in r["bad_shard"]
        assert r["tensor_collectives"] == r["tensors"] == 6
        assert r["full_equal"]
        assert r["shard_types"] == [FlatRangeShard.__name__]
    _load_into_plain_ema(path, results[0]["reference"])


@requires_distributed
@pytest.mark.slow
def test_checkpoint_reshards_from_two_ranks_to_three(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    reference = run_world(_world_two, 2, tmp_path, path)[0]["reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = run_world(_load, 3, tmp_path, path, reference)
    for r in results:
        assert r["step"] == 6
        assert r["products"] == reference["products"]
        assert r["changed"]
        assert r["locals_equal"]
        assert r["full_equal"]
