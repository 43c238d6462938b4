"""Source readers: how an update reads the live tensors of one shadow group, one strategy per layout.

Every reader answers two questions: ``read()`` gives the group's live weights as one contiguous ``(N,)``
tensor laid out like a shadow row (``polyak._layout``: tensors by shape class), or None when the kernels
should take the tensors one by one (``sources``); ``moved()`` says whether a source was re-pointed
(``p.data = ...``, ``model.half()``) in a way the reader cannot follow, so the facade builds a new one.
``plan_reader`` picks the strategy:

* ``foreach``: the tensors as they are (per-tensor ``_foreach`` kernels); for large tensors;
* ``gather``: many small tensors laid end to end in a scratch buffer with one ``torch.cat`` per shape
  class over the live tensors themselves (measured on a 2-core CPU: ``cat`` + one flat ``lerp_`` beats
  ``_foreach_lerp_`` below ~64K elements per tensor when the flat source is read more than once: by K > 1
  averages or by the finiteness check). Reading the tensors themselves, not cached views of their
  storage, follows a re-pointed ``p.data`` for free: no per-update comparison of data pointers;
* ``flat``: the parameters are views of one flat buffer (``EMA(flatten=True)``): no gather at all;
* ``offload``: CPU shadows of CUDA weights: one pinned staging buffer, filled on a side stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "FlatReader",
    "ForeachReader",
    "GatherReader",
    "OffloadReader",
    "Reader",
    "SourceChanged",
    "flatten_sources",
    "layout_key",
    "plan_reader",
    "pointers_moved",
    "shape_class",
    "storage_refs",
]


class SourceChanged(RuntimeError):
    """A live tensor no longer fits the reader's layout (re-assigned with another shape)."""


# Mean elements per tensor below which a group is gathered (see the module docstring) when the flat
# source is read more than once, and when it is read once (one average, no check): measured on a 2-core
# CPU with 2M weights in Linear(n, n) layers, one thread, unchecked, gather against _foreach_lerp_:
# 2.7 ms against 5.6 ms at 406 elements per tensor, 0.81 against 1.16 at 2K, equal at 8K, 0.71
# against 0.51 at 33K.
GATHER_MEAN_NUMEL = 1 << 16
GATHER_MEAN_NUMEL_READ_ONCE = 1 << 12


def shape_class(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Tensors of one class can be concatenated along dim 0 (same number of dimensions, same trailing
    shape); 0-dim tensors form the class ``(-1,)`` and are stacked."""
    return (len(shape), *shape[1:]) if len(shape) else (-1,)


def layout_key(shape: tuple[int, ...] | torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sort key of the row layout: by shape class, and by full shape inside a class, so that a class whose
    tensors all share one shape can be stacked (``torch.stack`` costs about half of ``torch.cat`` per
    tensor on a 2-core CPU: 1.4 against 3.4 ms for 2,500 tensors of 28 x 28)."""
    return shape_class(shape), tuple(shape)


def pointers_moved(sources: Sequence[Tensor], ptrs: Sequence[int]) -> bool:
    """Compare every source's ``data_ptr`` with the one recorded when the reader was built (cached views
    keep the old storage alive, so an unchanged pointer means an unchanged tensor)."""
    return list(map(Tensor.data_ptr, sources)) != list(ptrs)


def storage_refs(tensor: Tensor) -> int | None:
    """How many tensors (and storage objects) share ``tensor``'s storage, or None where torch does not
    expose it. Uses the private ``torch._C._storage_Use_Count`` for speed; every caller has a public
    fallback (comparing ``data_ptr``s) for None."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(tensor.untyped_storage()._cdata))


class Reader:
    """The common interface (see the module docstring)."""

    kind: ClassVar[str] = "foreach"

    def __init__(
        self, sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device, order: Sequence[int] | None = None
    ) -> None:
        self.sources = list(sources)
        self.order = list(order) if order is not None else list(range(len(self.sources)))  # row layout
        self.ptrs = [s.data_ptr() for s in self.sources]
        # every source already has the shadow's dtype and device: the per-tensor kernels skip their scan
        self.same_dtype = all(s.dtype == dtype and s.device == device for s in self.sources)

    def read(self) -> Tensor | None:
        return None

    def moved(self) -> bool:
        return pointers_moved(self.sources, self.ptrs)


class ForeachReader(Reader):
    """The tensors as they are: the kernels run ``_foreach`` over the list."""

    kind: ClassVar[str] = "foreach"


class GatherReader(Reader):
    """The live tensors laid end to end in ``scratch`` (the shadow dtype, the row layout): one
    ``torch.stack(out=)`` per shape class whose tensors share one shape, else one ``torch.cat(out=)``
    (``polyak._layout``), over the source
    tensors themselves, so a re-pointed ``p.data`` (same shape; any dtype, cast exactly by ``cat``) is read
    where it now points, and ``moved()`` has nothing to compare.

    Each output view is emptied before its ``cat``, which sizes it again in place; a source re-pointed to
    another shape gives it another shape, which ``read`` notices (one comparison per run) and raises
    ``SourceChanged`` before any shadow is written.
    """

    kind: ClassVar[str] = "gather"

    def __init__(
        self, sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device, order: Sequence[int] | None = None
    ) -> None:
        super().__init__(sources, dtype, device, order)
        self.scratch = torch.empty(sum(s.numel() for s in self.sources), dtype=dtype, device=device)
        # runs of one shape class, in row order: (stack?, tensors, output view of scratch, its shape)
        self.runs: list[tuple[bool, list[Tensor], Tensor, torch.Size]] = []
        offset = 0
        i = 0
        while i < len(self.order):
            cls = shape_class(self.sources[self.order[i]].shape)
            j = i
            while j < len(self.order) and shape_class(self.sources[self.order[j]].shape) == cls:
                j += 1
            members = [self.sources[k] for k in self.order[i:j]]
            n = sum(m.numel() for m in members)
            flat = self.scratch[offset : offset + n]
            stack = len({tuple(m.shape) for m in members}) == 1
            out = flat.view(len(members), *members[0].shape) if stack else flat.view(-1, *members[0].shape[1:])
            self.runs.append((stack, members, out, out.shape))
            offset += n
            i = j

    def read(self) -> Tensor:
        for stack, members, out, _ in self.runs:
            out.resize_(0)  # an empty output: cat sizes it (in place, same storage offset) without a warning
            if stack:
                torch.stack(members, out=out)
            else:
                torch.cat(members, out=out)
        if any(out.shape != shape for _, _, out, shape in self.runs):
            raise SourceChanged("a tensor averaged by this EMA was re-assigned with another shape")
        return self.scratch

    def moved(self) -> bool:
        return False


class FlatReader(Reader):
    """The sources are views of ``flat``, laid out like a shadow row: read nothing, copy nothing.

    ``moved`` first reads one number, how many tensors share the flat buffer's storage: re-pointing a
    source drops its reference, so the count changes and only then are the pointers compared. While the
    count is unchanged no source can have left, unless a new alias of the buffer was created in the same
    interval (a view of a parameter kept alive across ``update()`` while another parameter was
    re-pointed), which this screen cannot tell apart. Without the count (``storage_refs`` None), every
    update compares the pointers.
    """

    kind: ClassVar[str] = "flat"

    def __init__(
        self,
        sources: Sequence[Tensor],
        dtype: torch.dtype,
        device: torch.device,
        flat: Tensor,
        order: Sequence[int] | None = None,
    ) -> None:
        super().__init__(sources, dtype, device, order)
        self.flat = flat
        self.refs = storage_refs(flat)

    def read(self) -> Tensor:
        return self.flat

    def moved(self) -> bool:
        if self.refs is None:
            return pointers_moved(self.sources, self.ptrs)
        refs = storage_refs(self.flat)
        if refs == self.refs:
            return False
        moved = pointers_moved(self.sources, self.ptrs)
        if not moved:
            self.refs = refs  # a view of the buffer came or went: new baseline
        return moved


class OffloadReader(Reader):
    """``device="cpu"`` with a CUDA model: every weight copied into one pinned host buffer on a side
    stream (after the work already queued on the current stream); the host waits for that copy only,
    once per update, and the training stream never waits."""

    kind: ClassVar[str] = "offload"

    def __init__(
        self, sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device, order: Sequence[int] | None = None
    ) -> None:
        super().__init__(sources, dtype, device, order)
        self.views = [self.sources[i].detach().view(-1) for i in self.order]  # the row layout
        self.staging = torch.empty(sum(v.numel() for v in self.views), dtype=self.sources[0].dtype, pin_memory=True)
        self.stream: Any = torch.cuda.Stream(device=self.sources[0].device)  # type: ignore[no-untyped-call]

    def read(self) -> Tensor:
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.sources[0].device))
        with torch.cuda.stream(stream):
            offset = 0
            for view in self.views:
                n = view.numel()
                self.staging[offset : offset + n].copy_(view, non_blocking=True)
                offset += n
            event = stream.record_event()
        event.synchronize()
        return self.staging


def _gatherable(sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Sources can be read as cached 1-D views: contiguous, real floating, on the shadow's device."""
    return not dtype.is_complex and all(
        s.is_contiguous() and s.is_floating_point() and s.device == device and s.numel() > 0 for s in sources
    )


def _offloadable(sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """CPU shadows of weights that all live on one CUDA device, in one dtype, contiguous."""
    return (
        device.type == "cpu"
        and bool(sources)
        and sources[0].device.type == "cuda"
        and len({(s.device, s.dtype) for s in sources}) == 1
        and all(s.is_contiguous() and s.is_floating_point() and s.numel() > 0 for s in sources)
        and not dtype.is_complex
    )


def plan_reader(
    sources: Sequence[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    *,
    num_averages: int,
    check: bool,
    force_gather: bool = False,
    order: Sequence[int] | None = None,
) -> Reader:
    """Choose how ``update()`` reads these sources (module docstring). Gathering pays below 64K elements
    per tensor when the flat source is read more than once (K > 1 or the ``check``), below 4K when it is
    read once; ``force_gather``: a flat source is needed (the device-side check masks it)."""
    if _offloadable(sources, dtype, device):
        return OffloadReader(sources, dtype, device, order)
    if not sources or not _gatherable(sources, dtype, device):
        return ForeachReader(sources, dtype, device, order)
    mean = sum(s.numel() for s in sources) / len(sources)
    read_once = min(GATHER_MEAN_NUMEL, GATHER_MEAN_NUMEL_READ_ONCE)
    small = mean < (GATHER_MEAN_NUMEL if num_averages > 1 or check else read_once)
    if force_gather or small:
        return GatherReader(sources, dtype, device, order)
    return ForeachReader(sources, dtype, device, order)


def flatten_sources(
    sources: Sequence[Tensor], dtype: torch.dtype, device: torch.device, order: Sequence[int] | None = None
) -> FlatReader | None:
    """Make the sources views of one contiguous buffer laid out like the shadow rows, and return the
    reader of that buffer; None (nothing changed) when they do not share one dtype and device or are not
    contiguous. ``order``: the row layout (``polyak._layout``). Each source keeps its identity (``p.data`` is re-pointed, as ``torch.nn.Module._apply``
    does), so optimizers built before or after keep working; its values are copied exactly."""
    if not sources or not _gatherable(sources, dtype, device) or len({(s.dtype, s.device) for s in sources}) != 1:
        return None
    with torch.no_grad():
        flat = torch.empty(sum(s.numel() for s in sources), dtype=sources[0].dtype, device=sources[0].device)
        offset = 0
        for i in order if order is not None else range(len(sources)):
            s = sources[i]
            n = s.numel()
            view = flat[offset : offset + n].view(s.shape)
            view.copy_(s.detach())
            s.data = view
            offset += n
        del view  # count only the lasting views in the baseline below
    return FlatReader(sources, dtype, device, flat, order)
