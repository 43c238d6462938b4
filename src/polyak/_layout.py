"""Shadow storage: one flat buffer per (device, dtype) group, with a view per averaged tensor.

A group's buffer has shape ``(K, N)``: K averages (one per decay) of N elements, the tensors of the
group laid end to end. ``views[k][i]`` is the k-th average of the group's i-th tensor, shaped like it.
Keeping every shadow in one buffer lets the update run as a handful of fused ops, lets a state dict be
read without walking the model, and lets all shadows move or convert together. How a group's live
tensors are read each update is its ``reader`` (``polyak._readers``).

Within a row the tensors are laid out by shape class (``shape_class``: number of dimensions and trailing
shape), then by shape, in model order among equal shapes, so that the live tensors of one class can be gathered into the
row's layout with one ``torch.cat`` over the tensors themselves (``polyak._readers.GatherReader``). The
lists ``keys``/``sources``/``views[k]`` stay in model order; ``order`` is the row order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from polyak._readers import ForeachReader, Reader, layout_key
from polyak._select import Selected

__all__ = ["Group", "build_groups", "check_one_device", "row_order", "shadow_dtype"]


@dataclass
class Group:
    """The shadows of every averaged tensor that shares a shadow device and dtype."""

    device: torch.device
    dtype: torch.dtype
    keys: list[str]  # normalised keys, in model order
    sources: list[Tensor]  # the live parameters/buffers, in model order
    flat: Tensor  # (K, N)
    views: list[list[Tensor]] = field(default_factory=list)  # views[k][i]
    order: list[int] = field(default_factory=list)  # indices into sources, in the row's layout order
    reader: Reader = field(default_factory=lambda: ForeachReader([], torch.float32, torch.device("cpu")))

    @property
    def numel(self) -> int:
        return int(self.flat.shape[1])

    @property
    def plan(self) -> str:
        """The reader's name: ``"foreach"``, ``"gather"``, ``"flat"`` or ``"offload"``."""
        return self.reader.kind


def shadow_dtype(source: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    """float32 shadows for half-precision weights (a bf16 shadow at decay 0.9999 never moves: the update
    (1 - d) * (w - s) is below half an ulp of s), the weight's own dtype otherwise; ``override`` wins."""
    if override is not None:
        return override
    if source in (torch.float16, torch.bfloat16):
        return torch.float32
    return source


def row_order(sources: list[Tensor]) -> list[int]:
    """The layout order of a shadow row: by shape class, by shape inside a class (first appearance of
    each), model order among equal shapes (``polyak._readers.layout_key``)."""
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for s in sources:
        first.setdefault(layout_key(s.shape), len(first))
    rank = {key: (min(v for k, v in first.items() if k[0] == key[0]), v) for key, v in first.items()}
    return sorted(range(len(sources)), key=lambda i: rank[layout_key(sources[i].shape)])


def build_groups(
    selected: list[Selected],
    *,
    num_averages: int,
    dtype: torch.dtype | None,
    device: torch.device | None,
    local: Mapping[str, Tensor] | None = None,
) -> list[Group]:
    """Allocate one ``(K, N)`` buffer per (device, dtype) and carve a view per averaged tensor.

    ``local`` maps the key of a sharded tensor to this rank's part of it (``polyak._sharding``): its
    shadow and its source are the local part."""
    local = local or {}
    by_group: dict[tuple[torch.device, torch.dtype], list[Selected]] = {}
    for s in selected:
        if s.mode != "average":
            continue
        src = local.get(s.key, s.tensor)
        sdtype = shadow_dtype(src.dtype, dtype)
        if src.is_complex() and not sdtype.is_complex:
            sdtype = src.dtype
        sdev = device if device is not None else src.device
        by_group.setdefault((sdev, sdtype), []).append(s)

    groups: list[Group] = []
    for (gdev, gdtype), members in by_group.items():
        sources = [local.get(m.key, m.tensor) for m in members]
        total = sum(t.numel() for t in sources)
        flat = torch.empty((num_averages, total), dtype=gdtype, device=gdev)
        if gdev.type == "cpu" and any(t.device.type == "cuda" for t in sources):
            flat = flat.pin_memory()
        group = Group(
            gdev, gdtype, [m.key for m in members], sources, flat, reader=ForeachReader(sources, gdtype, gdev)
        )
        group.order = row_order(sources)
        group.views = [_carve(flat[k], group.sources, group.order) for k in range(num_averages)]
        groups.append(group)
    return groups


def _carve(row: Tensor, like: list[Tensor], order: list[int]) -> list[Tensor]:
    """A view of ``row`` per tensor of ``like`` (model order), placed in the row in ``order``."""
    views: list[Tensor | None] = [None] * len(like)
    offset = 0
    for i in order:
        n = like[i].numel()
        views[i] = row[offset : offset + n].view(like[i].shape)
        offset += n
    return [v for v in views if v is not None]


def check_one_device(groups: list[Group], device: torch.device | None) -> None:
    """``EMA(capturable=True)``: every shadow on its weights' device (a copy to another device every
    update cannot be captured)."""
    for group in groups:
        moved = sorted({str(s.device) for s in group.sources if s.device != group.device})
        if moved:
            raise ValueError(
                f"EMA(capturable=True) keeps the shadows on the weights' device, but shadows on {group.device} "
                f"were asked for weights on {', '.join(moved)} (device={str(device)!r}); copying the weights "
                "to another device every update cannot be captured. Leave device=None, or use capturable=False "
                "for an offloaded average"
            )
