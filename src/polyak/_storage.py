"""Shadow storage: one flat buffer per (device, dtype) group, with a view per averaged tensor.

A group's buffer has shape ``(K, N)``: K averages (one per decay) of N elements, the tensors of the
group laid end to end. ``views[k][i]`` is the k-th average of the group's i-th tensor, shaped like it.
Keeping every shadow in one buffer lets the update run as a handful of fused ops, lets a state dict be
read without walking the model, and lets all shadows move or convert together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from polyak._select import Selected

log = logging.getLogger("polyak")

Plan = Literal["foreach", "gather", "flat", "offload"]

# A group whose tensors hold fewer elements than this on average is gathered into one contiguous scratch
# per update (one ``torch.cat``) instead of being updated by per-tensor ``_foreach`` calls: measured on a
# 2-core CPU, ``cat`` + flat ``lerp_`` beats ``_foreach_lerp_`` below ~64K elements per tensor and loses
# above it (the gather is an extra read and write of every weight). See benchmarks/bench_update.py.
GATHER_MEAN_NUMEL = 1 << 16


@dataclass
class Group:
    """The shadows of every averaged tensor that shares a shadow device and dtype."""

    device: torch.device
    dtype: torch.dtype
    keys: list[str]  # normalised keys, in buffer order
    sources: list[Tensor]  # the live parameters/buffers, in buffer order
    flat: Tensor  # (K, N)
    views: list[list[Tensor]] = field(default_factory=list)  # views[k][i]
    # How update() reads the sources: "foreach" (per-tensor lists), "gather" (cat the cached 1-D views
    # into ``scratch``), "flat" (the sources are views of ``source_flat``, laid out like the shadow).
    plan: Plan = "foreach"
    source_views: list[Tensor] = field(default_factory=list)  # detached 1-D views of the sources
    source_ptrs: list[int] = field(default_factory=list)  # their data_ptr(), to detect re-assignment
    same_dtype: bool = False  # every source already has the shadow's dtype and device
    scratch: Tensor | None = None  # (N,) gather buffer ("gather": shadow dtype; "offload": pinned, source dtype)
    stream: Any = None  # "offload": the CUDA side stream that copies the weights to the host
    source_flat: Tensor | None = None  # (N,) buffer that the sources are views of ("flat")
    # "flat": how many tensors shared ``source_flat``'s storage when the pointers were last verified
    # (None where torch does not expose the count: every update then compares the pointers)
    flat_refs: int | None = None

    @property
    def numel(self) -> int:
        return int(self.flat.shape[1])


def shadow_dtype(source: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    """float32 shadows for half-precision weights (a bf16 shadow at decay 0.9999 never moves: the update
    (1 - d) * (w - s) is below half an ulp of s), the weight's own dtype otherwise; ``override`` wins."""
    if override is not None:
        return override
    if source in (torch.float16, torch.bfloat16):
        return torch.float32
    return source


def build_groups(
    selected: list[Selected],
    *,
    num_averages: int,
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> list[Group]:
    """Allocate one ``(K, N)`` buffer per (device, dtype) and carve a view per averaged tensor."""
    by_group: dict[tuple[torch.device, torch.dtype], list[Selected]] = {}
    for s in selected:
        if s.mode != "average":
            continue
        src = s.tensor
        sdtype = shadow_dtype(src.dtype, dtype)
        if src.is_complex() and not sdtype.is_complex:
            sdtype = src.dtype
        sdev = device if device is not None else src.device
        by_group.setdefault((sdev, sdtype), []).append(s)

    groups: list[Group] = []
    for (gdev, gdtype), members in by_group.items():
        total = sum(m.tensor.numel() for m in members)
        flat = torch.empty((num_averages, total), dtype=gdtype, device=gdev)
        if gdev.type == "cpu" and any(m.tensor.device.type == "cuda" for m in members):
            flat = flat.pin_memory()
        group = Group(gdev, gdtype, [m.key for m in members], [m.tensor for m in members], flat)
        group.views = [_carve(flat[k], group.sources) for k in range(num_averages)]
        groups.append(group)
    return groups


def _carve(row: Tensor, like: list[Tensor]) -> list[Tensor]:
    views: list[Tensor] = []
    offset = 0
    for t in like:
        n = t.numel()
        views.append(row[offset : offset + n].view(t.shape))
        offset += n
    return views


def _gatherable(group: Group) -> bool:
    """Sources can be read as cached 1-D views: contiguous, real floating, on the shadow's device."""
    return (
        all(
            s.is_contiguous() and s.is_floating_point() and s.device == group.device and s.numel() > 0
            for s in group.sources
        )
        and not group.dtype.is_complex
    )


def _offloadable(group: Group) -> bool:
    """CPU shadows of weights that all live on one CUDA device, in one dtype, contiguous."""
    srcs = group.sources
    return (
        group.device.type == "cpu"
        and bool(srcs)
        and srcs[0].device.type == "cuda"
        and len({(s.device, s.dtype) for s in srcs}) == 1
        and all(s.is_contiguous() and s.is_floating_point() and s.numel() > 0 for s in srcs)
        and not group.dtype.is_complex
    )


def copy_to_host(group: Group) -> Tensor:
    """``device="cpu"`` with a CUDA model: copy every weight into the group's pinned host buffer on a
    side stream (after the work already queued on the current stream), and wait for that copy only.

    The training stream never waits for the copy; the host waits once per update for the weights of
    this step to reach host memory (instead of once per tensor with ``tensor.to("cpu")``).
    """
    staging = group.scratch
    if staging is None or group.stream is None:
        raise RuntimeError("copy_to_host needs an 'offload' plan")
    stream = group.stream
    stream.wait_stream(torch.cuda.current_stream(group.sources[0].device))
    with torch.cuda.stream(stream):
        offset = 0
        for view in group.source_views:
            n = view.numel()
            staging[offset : offset + n].copy_(view, non_blocking=True)
            offset += n
        event = stream.record_event()
    event.synchronize()
    return staging


def plan_group(group: Group, num_averages: int, *, check: bool, force_gather: bool = False) -> None:
    """Choose how ``update()`` reads this group's sources, and cache what that plan needs.

    Gathering small tensors pays when the flat source is read more than once: by K > 1 averages or by
    the finiteness ``check`` (one sum on the flat source instead of one per tensor). For one
    unchecked average, one ``_foreach_lerp_`` costs about the same as the ``cat`` alone, so it stays.
    """
    group.source_flat = None
    group.flat_refs = None
    group.scratch = None
    group.source_views = []
    group.source_ptrs = []
    group.plan = "foreach"
    group.same_dtype = all(s.dtype == group.dtype and s.device == group.device for s in group.sources)
    group.source_ptrs = [s.data_ptr() for s in group.sources]  # re-planned when a source moves
    if _offloadable(group):
        _cache_views(group)
        group.scratch = torch.empty(group.numel, dtype=group.sources[0].dtype, pin_memory=True)
        group.stream = torch.cuda.Stream(device=group.sources[0].device)  # type: ignore[no-untyped-call]
        group.plan = "offload"
        return
    if not group.sources or not _gatherable(group):
        return
    mean = group.numel / len(group.sources)
    small = mean < GATHER_MEAN_NUMEL and (num_averages > 1 or check)
    if not (force_gather or small):
        return
    _cache_views(group)
    group.scratch = torch.empty(group.numel, dtype=group.dtype, device=group.device)
    group.plan = "gather"


def _cache_views(group: Group) -> None:
    group.source_views = [s.detach().view(-1) for s in group.sources]
    group.source_ptrs = [s.data_ptr() for s in group.sources]


def sources_moved(group: Group) -> bool:
    """True when a source no longer lives where the cached views point (``p.data = ...``, ``model.to``).

    Cached views keep the old storage alive, so an unchanged ``data_ptr`` means an unchanged tensor.
    Comparing pointers costs ~0.1-0.3 µs per tensor in Python, which is more than the whole flat lerp
    of a model with thousands of small tensors. So a "flat" group first reads one number: how many
    tensors share the flat buffer's storage. Re-pointing a source (``p.data = x``, ``model.half()``)
    drops its reference, so the count changes and the pointers are compared; while the count is
    unchanged no source can have left, unless a new alias of the flat buffer was created in the same
    interval (e.g. a view of a parameter kept alive across ``update()``, while another parameter was
    re-pointed), which this screen cannot tell apart.
    """
    if group.plan == "flat" and group.source_flat is not None and group.flat_refs is not None:
        refs = storage_refs(group.source_flat)
        if refs == group.flat_refs:
            return False
        moved = pointers_moved(group)
        if not moved:
            group.flat_refs = refs  # a view of the buffer came or went: new baseline
        return moved
    return pointers_moved(group)


def pointers_moved(group: Group) -> bool:
    """Compare every source's ``data_ptr`` with the one recorded when the group was planned."""
    return list(map(Tensor.data_ptr, group.sources)) != group.source_ptrs


def storage_refs(tensor: Tensor) -> int | None:
    """How many tensors (and storage objects) share ``tensor``'s storage; None if torch hides it."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(tensor.untyped_storage()._cdata))


def flatten_sources(group: Group) -> bool:
    """Make the group's sources views of one contiguous buffer laid out like the shadow rows.

    Each source keeps its identity (``p.data`` is re-pointed, as ``torch.nn.Module._apply`` does), so
    optimizers built before or after keep working; its values are copied exactly. Returns False (and
    changes nothing) when the sources do not share one dtype and device or are not contiguous.
    """
    srcs = group.sources
    if not srcs or not _gatherable(group) or len({(s.dtype, s.device) for s in srcs}) != 1:
        return False
    with torch.no_grad():
        flat = torch.empty(group.numel, dtype=srcs[0].dtype, device=srcs[0].device)
        offset = 0
        for s in srcs:
            n = s.numel()
            view = flat[offset : offset + n].view(s.shape)
            view.copy_(s.detach())
            s.data = view
            offset += n
        del view  # count only the lasting views in the baseline below
    group.source_flat = flat
    group.scratch = None
    _cache_views(group)
    group.plan = "flat"
    group.flat_refs = storage_refs(flat)
    return True
