"""Rank-sharded shadows for replicated (DDP) parameters: each rank keeps 1/world of every shadow group.

Under DDP every rank holds the same weights, so a full average on every rank is ``world`` copies of one
thing. Here a group's ``(K, N)`` shadow buffer (``polyak._layout``) is split along N the way
``torch.chunk(flat, world, dim=1)`` splits it, the layout of ZeRO-3 and FSDP1 flat parameters: with
``c = ceil(N / world)``, rank r keeps the columns ``[min(r c, N), min((r + 1) c, N))`` (the last ranks
hold fewer, or none, when N is not a multiple of world or N < world). Since the rank holds the whole
live model, an update lerps its columns from its own copy of the weights: no collective, and the bits
of the replicated average (the lerp is elementwise, the same kernel on the same numbers). Only
parameters are split (``layouts_of``): DDP's buffers differ across ranks between forwards, so each rank
keeps its own whole.

The columns of a rank cut the row into *pieces*: for each live tensor, the 1-D slice ``[start, stop)`` of
its flattened elements that falls in the rank's range (``pieces``, ``tensor_ranges``). ``RankSlice`` is
the placement of one tensor (``polyak._sharding``'s seam): its ``local(live)`` is the live piece, a view
the engine reads each update with its own readers and kernels; ``RankLayout.gather_`` (``apply``: one
all-gather per shadow group into the live weights), ``gather_tensor`` (one full tensor, for streaming
a state) and ``take`` (a rank's part of a full tensor, loading a standard file) move between the forms.

For ``torch.distributed.checkpoint`` a rank's part of one N-D tensor is ``FlatRangeShard``: a tensor of
the full shape (the keys and shapes of a plain EMA's state) that holds only the flat range
``[start, stop)``, described to DCP as the few boxes that range is made of (``flat_boxes``: a partial
row, full rows, a partial row, recursively). DCP reshards such states between world sizes and loads them
into a plain, single-process EMA.

Collectives (every rank of the process group must call them, in the same order): ``gather_row``,
``RankLayout.gather_``, ``gather_tensor`` and ``RankSlice.gather``/``FlatRangeShard.full_tensor``.
Everything else is local. ``torch.distributed`` is imported only by these and by ``process_group``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polyak._layout import row_order, shadow_dtype
from polyak._select import Selected
from polyak._validate import as_int

__all__ = [
    "Box",
    "FlatRangeShard",
    "Piece",
    "RankLayout",
    "RankSlice",
    "chunk_range",
    "chunk_size",
    "flat_boxes",
    "gather_row",
    "gather_tensor",
    "layouts_of",
    "pieces",
    "process_group",
    "rank_slices",
    "scatter_row_",
    "take",
    "tensor_ranges",
]


# --- the layout: pure functions ---------------------------------------------------------------------


def chunk_size(numel: int, world: int) -> int:
    """``ceil(numel / world)``: the columns of every rank but the last ones (``torch.chunk``)."""
    return -(-numel // world)


def chunk_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """The columns ``[lo, hi)`` of ``rank`` in a row of ``numel`` split over ``world`` ranks as
    ``torch.chunk`` splits it: ``lo = min(r c, numel)``, ``hi = min((r + 1) c, numel)``, ``c =
    ceil(numel / world)``; empty (``lo == hi``) for the ranks past the last chunk."""
    numel = as_int(numel, "numel", minimum=0)
    world = as_int(world, "world", minimum=1)
    rank = as_int(rank, "rank", minimum=0, maximum=world - 1)
    c = chunk_size(numel, world)
    return min(rank * c, numel), min((rank + 1) * c, numel)


@dataclass(frozen=True)
class Piece:
    """The part of one live tensor in a rank's columns: its flattened elements ``[start, stop)``, held at
    ``offset`` in the rank's local row. ``index`` points into ``Group.sources`` (model order)."""

    index: int
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def pieces(numels: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Piece]:
    """The pieces of the columns ``[lo, hi)`` of a row that lays tensors of ``numels`` (model order) end
    to end in ``order`` (``Group.order``), in row order; tensors outside the range (and empty ones) have
    no piece. The pieces tile ``[0, hi - lo)`` of the local row."""
    out: list[Piece] = []
    pos = 0
    for i in order:
        n = numels[i]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Piece(i, a - pos, b - pos, a - lo))
        pos += n
    return out


def tensor_ranges(numels: Sequence[int], order: Sequence[int], world: int) -> list[list[tuple[int, int]]]:
    """For each tensor (model order), the flattened range ``[start, stop)`` that each rank holds (empty
    ranges included): ``ranges[i][r]``. Every rank computes the same table (no collective)."""
    n = sum(numels)
    out: list[list[tuple[int, int]]] = [[(0, 0)] * world for _ in numels]
    for r in range(world):
        for p in pieces(numels, order, *chunk_range(n, world, r)):
            out[p.index][r] = (p.start, p.stop)
    return out


def rank_slices(
    shapes: Sequence[Sequence[int]], order: Sequence[int], world: int, rank: int, group: Any = None
) -> list[RankSlice]:
    """The ``RankSlice`` of every tensor of a group (shapes in model order, row layout ``order``) on
    ``rank`` of ``world`` (no collective)."""
    ranges = tensor_ranges([math.prod(s) for s in shapes], order, world)
    return [RankSlice(tuple(int(d) for d in s), tuple(r), rank, group) for s, r in zip(shapes, ranges)]


def take(full: Tensor, start: int, stop: int) -> Tensor:
    """A rank's part of a full tensor: the view ``full.reshape(-1)[start:stop]`` (no collective; a copy
    only when ``full`` is not contiguous)."""
    return full.detach().reshape(-1)[start:stop]


# --- boxes: a flat range of a row-major tensor as N-D chunks (DCP) ---------------------------------------


@dataclass(frozen=True)
class Box:
    """An N-D chunk ``offsets``/``sizes`` of a row-major tensor that is also the contiguous flat range
    starting at ``start`` (every dimension before the first partial one has size 1)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The flat range ``[start, stop)`` of a row-major tensor of ``shape`` as at most ``2 ndim - 1``
    boxes, in flat order: the tail of a partial row (recursively), the full rows, the head of a partial
    row (recursively). Each box is contiguous in the flat order. ``[]`` for an empty range."""
    shape = tuple(int(d) for d in shape)
    if start >= stop:
        return []
    if not shape:
        return [Box((), (), 0)]
    out: list[Box] = []
    _boxes(shape, start, stop, (), out, 0)
    return out


def _boxes(shape: tuple[int, ...], start: int, stop: int, prefix: tuple[int, ...], out: list[Box], base: int) -> None:
    """Append the boxes of ``[start, stop)`` (0 <= start < stop <= numel) of a row-major ``shape`` at the
    fixed leading indices ``prefix`` (whose flat offset is ``base``)."""
    inner = math.prod(shape[1:])
    rest = shape[1:]
    r0, a = divmod(start, inner)
    r1, b = divmod(stop, inner)
    ones = (1,) * len(prefix)
    if r0 == r1:  # inside one row
        _boxes(rest, a, b, (*prefix, r0), out, base + r0 * inner)
        return
    if a:  # the tail of row r0
        _boxes(rest, a, inner, (*prefix, r0), out, base + r0 * inner)
        r0 += 1
    if r1 > r0:  # full rows
        out.append(Box((*prefix, r0, *(0,) * len(rest)), (*ones, r1 - r0, *rest), base + r0 * inner))
    if b:  # the head of row r1
        _boxes(rest, 0, b, (*prefix, r1), out, base + r1 * inner)


# --- collectives ---------------------------------------------------------------------------------------


def _all_gather(out: Tensor, part: Tensor, group: Any) -> None:
    """``out`` <- the equal-sized ``part`` of every rank, end to end: one all-gather."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13; all_gather_into_tensor before
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(out, part, group=group)


def gather_row(local: Tensor, numel: int, world: int, group: Any = None) -> Tensor:
    """The full ``(numel,)`` row from every rank's local columns (``(m,)``, ``m <= ceil(numel / world)``):
    ONE all-gather over ``group`` (a collective: every rank must call it). Shorter locals are padded to
    the chunk size, so the gathered buffer is the row followed by the padding."""
    c = chunk_size(numel, world)
    part = local
    if local.numel() != c:
        part = torch.zeros(c, dtype=local.dtype, device=local.device)
        part[: local.numel()].copy_(local)
    out = torch.empty(c * world, dtype=local.dtype, device=local.device)
    _all_gather(out, part, group)
    return out[:numel]


def scatter_row_(row: Tensor, sources: Sequence[Tensor], order: Sequence[int]) -> None:
    """Copy a full ``(N,)`` row (the row layout of ``polyak._layout``) into the live tensors (cast to
    their dtype), one ``_foreach_copy_``; no collective."""
    targets: list[Tensor] = []
    parts: list[Tensor] = []
    offset = 0
    for i in order:
        t = sources[i]
        n = t.numel()
        targets.append(t.detach())
        parts.append(row[offset : offset + n].view(t.shape))
        offset += n
    if targets:
        torch._foreach_copy_(targets, parts)


def gather_tensor(
    local: Tensor, shape: Sequence[int], ranges: Sequence[tuple[int, int]], rank: int, group: Any = None
) -> Tensor:
    """One full tensor of ``shape`` from every rank's flat range of it (``ranges[r]``, ``tensor_ranges``;
    ``local`` is this rank's, ``ranges[rank]`` long): ONE all-gather over ``group`` (a collective: every
    rank must call it, for every tensor, in the same order). Each rank then holds this one full tensor."""
    width = max(b - a for a, b in ranges)
    world = len(ranges)
    start, stop = ranges[rank]
    if local.numel() != stop - start:
        raise ValueError(f"this rank holds {local.numel()} elements of the tensor, its range is [{start}, {stop})")
    part = torch.zeros(width, dtype=local.dtype, device=local.device)
    part[: local.numel()].copy_(local.reshape(-1))
    out = torch.empty(width * world, dtype=local.dtype, device=local.device)
    _all_gather(out, part, group)
    full = torch.empty(math.prod(shape), dtype=local.dtype, device=local.device)
    for r, (a, b) in enumerate(ranges):
        full[a:b].copy_(out[r * width : r * width + b - a])
    return full.view(tuple(shape))


# --- a shadow group's rank layout ----------------------------------------------------------------------


def process_group(shard: Any) -> tuple[Any, int, int]:
    """``(group, world, rank)`` for ``EMA(shard=...)``: ``True`` is the default process group, a
    ``ProcessGroup`` itself; a ValueError or TypeError saying what to do otherwise (no collective)."""
    import torch.distributed as dist

    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if shard is not True and (group_type is None or not isinstance(shard, group_type)):
        raise TypeError(
            f"shard must be False, True (the default process group) or a torch.distributed.ProcessGroup, got "
            f"{type(shard).__name__} {shard!r}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "EMA(shard=...) splits the averages over the ranks of a process group, but torch.distributed has no "
            "initialised process group; call torch.distributed.init_process_group() first (as DDP needs), or "
            "leave shard=False"
        )
    group = None if shard is True else shard
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("EMA(shard=group): this process is not a member of that process group")
    return group, dist.get_world_size(group), rank


@dataclass(frozen=True)
class RankLayout:
    """The rank layout of one shadow group (``polyak._layout``: one per shadow device and dtype): its
    tensors' keys and shapes in model order, the row order, and the process group that splits the row.
    Rank ``rank`` keeps the columns ``chunk_range(numel, world, rank)``."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    world: int
    rank: int
    group: Any = None

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def slices(self) -> dict[str, RankSlice]:
        """The ``RankSlice`` of every tensor by key (no collective)."""
        return dict(zip(self.keys, rank_slices(self.shapes, self.order, self.world, self.rank, self.group)))

    def gather_(self, local: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> None:
        """Write the full row into the live tensors from every rank's local parts (``local[key]``: this
        rank's 1-D piece of each tensor, e.g. its average): ONE all-gather over the group, which every rank
        must call (``gather_row``), then a local copy into each live tensor (cast to its dtype)."""
        found = pieces(self.numels, self.order, *chunk_range(self.numel, self.world, self.rank))
        parts = [local[self.keys[p.index]] for p in found]
        mine = torch.cat(parts) if parts else local[self.keys[0]].new_empty(0)  # the group's dtype on every rank
        row = gather_row(mine, self.numel, self.world, self.group)
        scatter_row_(row, [live[k] for k in self.keys], self.order)


def layouts_of(
    selected: Sequence[Selected], *, dtype: torch.dtype | None, device: torch.device | None, shard: Any
) -> list[RankLayout]:
    """The rank layout of every shadow group the averaged *parameters* among ``selected`` would form
    (grouped and ordered as ``polyak._layout.build_groups`` groups full tensors), split over
    ``process_group(shard)``. Buffers are left whole: DDP copies rank 0's buffers to every rank at the
    start of each forward, and each rank's forward then changes its own (BatchNorm statistics of its own
    batch), so they are not replicated when the average is updated."""
    group, world, rank = process_group(shard)
    by_group: dict[tuple[torch.device, torch.dtype], list[Selected]] = {}
    for s in selected:
        if s.mode != "average" or s.is_buffer:
            continue
        sdtype = shadow_dtype(s.tensor.dtype, dtype)
        if s.tensor.is_complex() and not sdtype.is_complex:
            sdtype = s.tensor.dtype
        by_group.setdefault((device if device is not None else s.tensor.device, sdtype), []).append(s)
    return [
        RankLayout(
            tuple(m.key for m in members),
            tuple(tuple(m.tensor.shape) for m in members),
            tuple(row_order([m.tensor for m in members])),
            world,
            rank,
            group,
        )
        for members in by_group.values()
    ]


# --- one tensor's placement, and its checkpoint form ----------------------------------------------------


@dataclass(frozen=True)
class RankSlice:
    """Where a rank's part of one averaged tensor lives: the flat range ``ranges[rank]`` of a tensor of
    ``shape``, every rank's range recorded (``tensor_ranges``) so a full tensor is gathered without asking.

    It is the ``polyak._sharding.Placement`` of a rank-sharded tensor: ``local(live)`` (the live piece),
    ``stamp(live)``, ``wrap(local)`` (a ``FlatRangeShard`` for DCP), ``take(full)`` and ``accept(key,
    value)`` are local; ``gather(local)`` is a collective over ``group``.
    """

    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    rank: int
    group: Any = None
    _seen: list[Any] = field(default_factory=lambda: [None, -1, None], compare=False, repr=False)

    @property
    def start(self) -> int:
        return self.ranges[self.rank][0]

    @property
    def stop(self) -> int:
        return self.ranges[self.rank][1]

    def local(self, live: Tensor) -> Tensor:
        """This rank's 1-D piece of the live tensor: a view, the same object while ``live`` is the same
        tensor at the same address (the view keeps the storage it was cut from alive, so a re-pointed
        ``p.data`` always has another address: the live tensor is compared, never the view)."""
        seen = self._seen
        ptr = live.data_ptr()
        if seen[0] is live and seen[1] == ptr:
            return seen[2]  # type: ignore[no-any-return]
        t = live.detach()
        if not t.is_contiguous():
            raise ValueError(
                f"EMA(shard=...) averages a slice of each live tensor's storage, but a tensor of shape {self.shape} "
                f"is not contiguous (stride {t.stride()}); make it contiguous (p.data = p.data.contiguous())"
            )
        view = t.view(-1)[self.start : self.stop]
        seen[:] = [live, ptr, view]
        return view

    def stamp(self, live: Tensor) -> object:
        """What changes identity when ``live`` is re-pointed: its local piece (``local`` returns the same
        view object until then)."""
        return self.local(live)

    def wrap(self, local: Tensor) -> Tensor:
        """The DCP form of a local piece: a ``FlatRangeShard`` of the full shape (no copy, no collective)."""
        return FlatRangeShard(local, self)

    def gather(self, local: Tensor) -> Tensor:
        """The full tensor on every rank: ONE all-gather over the group (every rank must call it)."""
        return gather_tensor(local, self.shape, self.ranges, self.rank, self.group)

    def take(self, full: Tensor) -> Tensor:
        """This rank's part of a full tensor (no collective)."""
        return take(full, self.start, self.stop)

    def accept(self, key: str, value: Tensor) -> Tensor:
        """The local piece to load from a state value: a ``FlatRangeShard`` of this very range (a DCP load),
        or a full tensor of the shape (a standard file: each rank takes its part)."""
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: the state has {tuple(value.shape)}, the model has {self.shape}; "
                "build the EMA on the same architecture"
            )
        if isinstance(value, FlatRangeShard):
            if (value.start, value.stop) != (self.start, self.stop):
                raise ValueError(
                    f"{key!r} holds the elements [{value.start}, {value.stop}) of another rank layout, this rank "
                    f"holds [{self.start}, {self.stop}); load a full tensor or use torch.distributed.checkpoint, "
                    "which reshards"
                )
            return value.local
        return self.take(value)


class FlatRangeShard(Tensor):
    """A rank's flat range of one averaged tensor, as a value ``torch.distributed.checkpoint`` saves,
    loads and reshards: shaped like the full tensor (the key and shape of a plain EMA's state), holding
    only ``local``, the elements ``[start, stop)`` of its row-major flattening.

    DCP sees the range as the boxes of ``flat_boxes`` (``__create_write_items__``,
    ``__create_chunk_list__``, ``__get_tensor_shard__``, the hooks DTensor implements); each box is a
    view of ``local``, so a load writes straight into it. It is no tensor for arithmetic (any op but
    ``detach`` and ``to``, which act on ``local``, raises a TypeError): read ``local``, or ``full_tensor()`` (a collective) for the whole tensor.
    """

    local: Tensor
    placement: RankSlice
    boxes: list[Box]

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, local: Tensor, placement: RankSlice) -> FlatRangeShard:
        if local.dim() != 1 or local.numel() != placement.stop - placement.start:
            raise ValueError(
                f"a FlatRangeShard holds a 1-D tensor of {placement.stop - placement.start} elements, got shape "
                f"{tuple(local.shape)}"
            )
        shard: FlatRangeShard = Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, placement.shape, dtype=local.dtype, device=local.device, requires_grad=False
        )
        shard.local = local
        shard.placement = placement
        shard.boxes = flat_boxes(placement.shape, placement.start, placement.stop)
        return shard

    @property
    def start(self) -> int:
        return self.placement.start

    @property
    def stop(self) -> int:
        return self.placement.stop

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"FlatRangeShard(shape={tuple(self.shape)}, dtype={self.dtype}, elements [{self.start}, {self.stop}) "
            f"in {len(self.boxes)} box(es))"
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        if func is torch.ops.aten.detach.default:  # state-dict walkers detach every tensor
            return FlatRangeShard(args[0].local, args[0].placement)
        if func is torch.ops.aten._to_copy.default:  # .to(dtype, device, copy=True): the local part, cast
            return FlatRangeShard(func(args[0].local, *args[1:], **(kwargs or {})), args[0].placement)
        raise TypeError(
            f"{func} on a FlatRangeShard: it is a rank's part of an averaged tensor, for "
            "torch.distributed.checkpoint; use .local (this rank's elements) or .full_tensor() (a collective)"
        )

    def full_tensor(self) -> Tensor:
        """The whole tensor on every rank: ONE all-gather (every rank must call it)."""
        return self.placement.gather(self.local)

    def _box_view(self, box: Box) -> Tensor:
        lo = box.start - self.start
        return self.local[lo : lo + box.numel].view(box.sizes)

    # the hooks of torch.distributed.checkpoint (planner_helpers.py and utils.py)
    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        properties = TensorProperties.create_from_tensor(self.local)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(box.offsets), i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=torch.Size(box.sizes)),
                    properties=properties,
                    size=torch.Size(self.placement.shape),
                ),
            )
            for i, box in enumerate(self.boxes)
        ]

    def __create_chunk_list__(self) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)) for b in self.boxes]

    def __get_tensor_shard__(self, index: Any) -> Tensor:
        hint = index.index
        if hint is not None and hint < len(self.boxes) and self.boxes[hint].offsets == tuple(index.offset):
            return self._box_view(self.boxes[hint])
        for box in self.boxes:
            if box.offsets == tuple(index.offset):
                return self._box_view(box)
        raise ValueError(f"no box of {index.fqn!r} at offsets {tuple(index.offset)} on this rank ({self!r})")
