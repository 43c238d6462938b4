"""Rank-sharded shadows, the parts that need no process group: the ``torch.chunk`` column ranges, the
pieces they cut from each tensor, the DCP boxes of a flat range, the reader of the live pieces (ranks
simulated in one process against the replicated engine, bit for bit) and the checkpoint form."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from polyak import EMA, _kernels
from polyak._layout import row_order
from polyak._rank_shard import (
    FlatRangeShard,
    RankSlice,
    chunk_range,
    flat_boxes,
    pieces,
    rank_slices,
    scatter_row_,
    take,
    tensor_ranges,
)
from polyak._readers import plan_reader
from tests.distributed.toy import Net as _Net

shapes_st = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(0, 60), world=st.integers(1, 9))
def test_chunk_range_is_torch_chunk(numel: int, world: int) -> None:
    chunks = [c.tolist() for c in torch.chunk(torch.arange(numel), world)] if numel else []
    c = math.ceil(numel / world)
    for rank in range(world):
        lo, hi = chunk_range(numel, world, rank)
        expected = chunks[rank] if rank < len(chunks) else []
        assert list(range(lo, hi)) == expected
        assert hi - lo <= c
        if rank < world - 1 and hi - lo < c:  # only the last non-empty chunk is short, the rest are empty
            assert chunk_range(numel, world, rank + 1)[1] - chunk_range(numel, world, rank + 1)[0] == 0


def test_chunk_range_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank must be <= 1"):
        chunk_range(10, 2, 2)
    with pytest.raises(ValueError, match="world must be >= 1"):
        chunk_range(10, 0, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        chunk_range(10, 2, True)
    assert chunk_range(3, 5, 4) == (3, 3)  # N < world: the last ranks are empty


def _row(tensors: list[Tensor], order: list[int]) -> Tensor:
    return torch.cat([tensors[i].reshape(-1) for i in order]) if tensors else torch.zeros(0)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_st, world=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_pieces_cover_every_element_once_and_match_the_row(
    shapes: list[tuple[int, ...]], world: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    order = row_order(tensors)
    numels = [t.numel() for t in tensors]
    row = _row(tensors, order)
    n = row.numel()
    seen = [torch.zeros(t.numel(), dtype=torch.int64) for t in tensors]
    for rank in range(world):
        lo, hi = chunk_range(n, world, rank)
        found = pieces(numels, order, lo, hi)
        # the pieces tile the local row, in order, and hold the row's elements of this rank
        assert [p.offset for p in found] == [sum(q.numel for q in found[:j]) for j in range(len(found))]
        assert sum(p.numel for p in found) == hi - lo
        local = torch.cat([tensors[p.index].reshape(-1)[p.start : p.stop] for p in found]) if found else torch.zeros(0)
        assert torch.equal(local, row[lo:hi])
        for p in found:
            assert 0 <= p.start < p.stop <= numels[p.index]
            seen[p.index][p.start : p.stop] += 1
    assert all(bool((s == 1).all()) for s in seen)
    # the per-tensor table agrees with the pieces, and the ranges of one tensor are consecutive
    ranges = tensor_ranges(numels, order, world)
    for i, rs in enumerate(ranges):
        covered = sorted(r for r in rs if r[0] < r[1])
        assert [a for a, _ in covered] == ([0] + [b for _, b in covered[:-1]] if covered else [])
        assert (covered[-1][1] if covered else 0) == numels[i]


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple), data=st.data())
def test_flat_boxes_are_the_range(shape: tuple[int, ...], data: st.DataObject) -> None:
    numel = math.prod(shape)
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    full = torch.arange(numel).view(shape)
    boxes = flat_boxes(shape, start, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    got: list[int] = []
    for box in boxes:
        assert len(box.offsets) == len(box.sizes) == len(shape)
        part = full
        for dim, (o, s) in enumerate(zip(box.offsets, box.sizes)):
            assert o >= 0
            assert o + s <= shape[dim]
            assert s >= 1
            part = part.narrow(dim, o, s)
        values = part.reshape(-1).tolist()
        assert values == list(range(box.start, box.start + box.numel))  # contiguous in flat order
        got += values
    assert got == list(range(start, stop))


def test_flat_boxes_worked_example() -> None:
    # elements 5..22 of a (3, 2, 4) tensor: rest of row (0, 1), row 1 whole, then row (2, 0) up to 6
    boxes = flat_boxes((3, 2, 4), 5, 23)
    assert [(b.offsets, b.sizes) for b in boxes] == [
        ((0, 1, 1), (1, 1, 3)),
        ((1, 0, 0), (1, 2, 4)),
        ((2, 0, 0), (1, 1, 4)),
        ((2, 1, 0), (1, 1, 3)),
    ]
    assert flat_boxes((), 0, 1)[0].sizes == ()
    assert flat_boxes((4, 4), 3, 3) == []


def _step(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


class _Rank:
    """One simulated rank: the local pieces of the live tensors (``RankSlice.local``), a ``(K, m)`` local
    shadow with a 1-D view per piece, and the engine's own reader over the pieces (``plan_reader``)."""

    def __init__(self, sources: list[Tensor], order: list[int], world: int, rank: int, k: int, gather: bool) -> None:
        self.sources = sources
        self.slices = rank_slices([s.shape for s in sources], order, world, rank)
        self.pieces = [sl.local(s) for sl, s in zip(self.slices, sources)]
        self.flat = torch.empty(k, sum(p.numel() for p in self.pieces))
        offsets = [sum(p.numel() for p in self.pieces[:i]) for i in range(len(self.pieces))]
        self.views = [[row[o : o + p.numel()] for o, p in zip(offsets, self.pieces)] for row in self.flat]
        for views in self.views:
            _kernels.copy_(views, self.pieces)
        self.reader = plan_reader(
            self.pieces, torch.float32, torch.device("cpu"), num_averages=k, check=False, force_gather=gather
        )

    def follow(self) -> None:
        """What the EMA's watch does each update: a new stamp means a re-pointed tensor, so a new reader."""
        stamps = [sl.stamp(s) for sl, s in zip(self.slices, self.sources)]
        if any(a is not b for a, b in zip(stamps, self.pieces)):
            self.pieces = stamps
            self.reader = plan_reader(
                self.pieces, torch.float32, torch.device("cpu"), num_averages=len(self.views), check=False
            )

    def update(self, weights: list[float]) -> None:
        self.follow()
        src = self.reader.read()
        _kernels.lerp_shadows_(self.views, self.flat, self.pieces, src, weights, same_dtype=self.reader.same_dtype)

    def average(self, k: int, i: int) -> Tensor:
        return self.views[k][i]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("decays", [[0.9], [0.9, 0.5, 0.99]])
def test_simulated_ranks_give_the_replicated_average_bit_for_bit(gather: bool, decays: list[float]) -> None:
    """Every rank lerps its pieces from its own copy of the weights with the engine's readers and kernels;
    laid side by side, the pieces are the replicated EMA's averages, bit for bit, for world sizes 1 to 4
    and N + 3 (empty ranks); a re-pointed ``p.data`` is followed."""
    torch.manual_seed(0)
    model = _Net()
    ema = EMA(model, decay=decays, nonfinite="ignore")
    (group,) = ema._groups
    n, k = group.numel, len(decays)
    worlds = [1, 2, 3, 4, n + 3]
    ranks = {w: [_Rank(group.sources, group.order, w, r, k, gather) for r in range(w)] for w in worlds}
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        _step(model, g)
        if step == 2:
            with torch.no_grad():  # a re-pointed p.data: the old storage stays alive in the old pieces
                model.big.data = model.big.data.clone()
        ema.update()
        weights = [1 - b for b in ema._counters.last_decays]  # the decays of this update: lerp weight 1 - beta
        for world in worlds:
            for r in ranks[world]:
                r.update(weights)
    for world in worlds:
        for a in range(k):
            for i, full in enumerate(group.views[a]):
                parts = [r.average(a, i) for r in ranks[world]]
                assert torch.equal(torch.cat(parts).view(full.shape), full), (world, a, i)


def test_local_pieces_are_stable_until_the_tensor_is_repointed() -> None:
    model = _Net()
    sources = list(model.parameters())
    order = row_order(sources)
    slices = rank_slices([p.shape for p in sources], order, 2, 1)
    big = next(i for i, p in enumerate(sources) if p is model.big)
    sl = slices[big]
    piece = sl.local(model.big)
    assert sl.stamp(model.big) is piece  # the same view object: nothing to rebuild
    assert piece.numel() > 0
    with torch.no_grad():
        model.big.data = torch.full_like(model.big, 7.0)  # the old storage stays alive in `piece`
    fresh = sl.stamp(model.big)
    assert fresh is not piece
    assert bool((fresh == 7.0).all())
    assert sl.local(model.big) is fresh


def test_local_pieces_refuse_non_contiguous_tensors() -> None:
    t = torch.randn(4, 3).t()
    (sl,) = rank_slices([t.shape], [0], 2, 0)
    with pytest.raises(ValueError, match="not contiguous"):
        sl.local(t)


def test_scatter_row_writes_the_row_layout_into_the_live_tensors() -> None:
    model = _Net()
    sources = list(model.parameters())
    order = row_order(sources)
    row = torch.arange(sum(p.numel() for p in sources), dtype=torch.float32)
    scatter_row_(row, sources, order)
    assert torch.equal(_row([p.detach() for p in sources], order), row)


def test_rank_slice_take_accept_and_the_checkpoint_form() -> None:
    full = torch.randn(3, 4)
    world = 3
    slices = [rank_slices([(3, 4)], [0], world, r)[0] for r in range(world)]
    assert [s.ranges[s.rank] for s in slices] == [(0, 4), (4, 8), (8, 12)]
    other = RankSlice((3, 4), ((0, 6), (6, 12)), 0)
    for s in slices:
        local = s.take(full)
        assert torch.equal(local, full.reshape(-1)[s.start : s.stop])
        shard = s.wrap(local.clone())
        assert isinstance(shard, FlatRangeShard)
        assert shard.shape == (3, 4)
        assert torch.equal(s.accept("w", shard), local)
        assert torch.equal(s.accept("w", full), local)  # a full tensor: each rank takes its part
        with pytest.raises(ValueError, match="another rank layout"):
            s.accept("w", other.wrap(take(full, 0, 6)))
        with pytest.raises(ValueError, match="shape mismatch for 'w'"):
            s.accept("w", torch.zeros(4, 3))
        with pytest.raises(TypeError, match="use .local"):
            shard.sum()
        assert "elements [" in repr(shard)
        detached = shard.detach()
        assert isinstance(detached, FlatRangeShard)
        assert detached.local is shard.local
        cast = shard.to(dtype=torch.float64, copy=True)
        assert isinstance(cast, FlatRangeShard)
        assert cast.dtype == cast.local.dtype == torch.float64
        assert cast.local.data_ptr() != shard.local.data_ptr()
        assert torch.equal(cast.local, shard.local.double())
    with pytest.raises(ValueError, match="1-D tensor of 4 elements"):
        slices[0].wrap(torch.zeros(5))
