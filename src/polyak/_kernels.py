"""Pure update functions over flat buffers and lists of tensors (shadow views and live sources).

Every function here is stateless: it reads and writes the tensors it is given and returns nothing it
does not compute. The reference arithmetic is ``shadow.lerp_(source.to(shadow.dtype), 1 - beta)``;
every faster path runs that same ``lerp`` (same kernel, same scalar weight) on other layouts, so it gives
the same bits. Measured on a 2-core CPU (``benchmarks/bench_update.py``), the layouts that win are:

* many small tensors: gather them once into a contiguous scratch (one ``torch.stack``/``torch.cat``
  per shape class, ``polyak._readers.GatherReader``), then one flat ``lerp_`` per average;
* large tensors: one ``_foreach_lerp_`` (K = 1), or a tensor-major loop (K > 1) that lerps every average
  of one tensor while it is still in cache, so each weight is read from memory about once for all K;
* parameters that are already views of one flat buffer (``EMA(..., flatten=True)``): one flat ``lerp_``
  per average, no gather at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# Elements per block of the blocked multi-average lerp: large enough that the Python loop is cheap, small
# enough that the source block stays in the last-level cache while the K rows are updated.
BLOCK_ELEMENTS = 1 << 20


def cast_sources(sources: Sequence[Tensor], like: Tensor) -> list[Tensor]:
    """The sources in the shadow's dtype and device (no copy where they already match)."""
    return [s.to(device=like.device, dtype=like.dtype) for s in sources]


def lerp_(shadows: Sequence[Tensor], sources: Sequence[Tensor], weight: float) -> None:
    """shadow <- shadow + weight * (source - shadow), for every pair, in one foreach call."""
    if not shadows:
        return
    if weight == 1.0:
        torch._foreach_copy_(list(shadows), list(sources))
        return
    srcs = list(sources)
    if any(s.dtype != shadows[0].dtype or s.device != shadows[0].device for s in srcs):
        srcs = cast_sources(srcs, shadows[0])
    torch._foreach_lerp_(list(shadows), srcs, weight)


def lerp_tensor_major_(
    views: Sequence[list[Tensor]], sources: list[Tensor], weights: Sequence[float], *, same_dtype: bool = False
) -> None:
    """``views[k][i] <- lerp(views[k][i], sources[i], weights[k])`` for every k, one tensor at a time.

    With K = 1 this is one ``_foreach_lerp_`` (``same_dtype``: the caller knows that no source needs a
    cast, so the per-tensor dtype scan is skipped; ``_foreach_lerp_`` itself raises on a mismatch). With
    K > 1 all K averages of tensor i are updated while tensor i is in cache, so memory traffic is
    ~4 + 8K bytes per fp32 weight instead of 12K.
    """
    if len(views) == 1:
        if same_dtype and weights[0] != 1.0 and sources:
            torch._foreach_lerp_(views[0], sources, weights[0])
        else:
            lerp_(views[0], sources, weights[0])
        return
    if not sources:
        return
    like = views[0][0]
    for i, src in enumerate(sources):
        if src.dtype != like.dtype or src.device != like.device:
            src = src.to(device=like.device, dtype=like.dtype)
        n = src.numel()
        if n <= BLOCK_ELEMENTS or not src.is_contiguous():
            for k, w in enumerate(weights):
                _lerp_one_(views[k][i], src, w)
            continue
        flat_src = src.view(-1)
        rows = [views[k][i].view(-1) for k in range(len(weights))]
        for lo in range(0, n, BLOCK_ELEMENTS):
            block = flat_src[lo : lo + BLOCK_ELEMENTS]
            for row, w in zip(rows, weights):
                _lerp_one_(row[lo : lo + BLOCK_ELEMENTS], block, w)


def lerp_rows_(flat: Tensor, source: Tensor, weights: Sequence[float]) -> None:
    """``flat[k] <- lerp(flat[k], source, weights[k])`` for a ``(K, N)`` shadow and an ``(N,)`` source.

    K = 1 is one flat ``lerp_``; K > 1 walks the source in cache-sized blocks and updates the K rows of
    each block before moving on (the source is read from memory once).
    """
    if source.dtype != flat.dtype or source.device != flat.device:
        source = source.to(device=flat.device, dtype=flat.dtype)
    n = source.numel()
    if len(weights) == 1 or n <= BLOCK_ELEMENTS:
        for k, w in enumerate(weights):
            _lerp_one_(flat[k], source, w)
        return
    for lo in range(0, n, BLOCK_ELEMENTS):
        block = source[lo : lo + BLOCK_ELEMENTS]
        for k, w in enumerate(weights):
            _lerp_one_(flat[k, lo : lo + BLOCK_ELEMENTS], block, w)


def _lerp_one_(shadow: Tensor, source: Tensor, weight: float) -> None:
    if weight == 1.0:
        shadow.copy_(source)
    else:
        shadow.lerp_(source, weight)


def masked_lerp_rows_(flat: Tensor, source: Tensor, weights: Sequence[float], ok: Tensor) -> None:
    """Like ``lerp_rows_`` but a no-op (bit for bit) where the 0-dim bool ``ok`` is False, without reading
    ``ok`` on the host: the source is replaced by the shadow itself, and ``lerp(s, s, w) == s``."""
    if source.dtype != flat.dtype or source.device != flat.device:
        source = source.to(device=flat.device, dtype=flat.dtype)
    for k, w in enumerate(weights):
        row = flat[k]
        _lerp_one_(row, torch.where(ok, source, row), w)


def gather_(views: Sequence[Tensor], out: Tensor) -> Tensor:
    """Lay the 1-D ``views`` end to end in ``out`` (cast to its dtype) with one ``torch.cat``."""
    return torch.cat(list(views), out=out)


def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """target <- source (casting dtype/device) for every pair, in one foreach call."""
    if targets:
        torch._foreach_copy_(list(targets), list(sources))


def flat_finite(source: Tensor) -> Tensor:
    """A 0-dim bool tensor on the source's device: True when no element is NaN or infinite.

    One reduction pass (``aminmax``): min and max are finite exactly when every element is (NaN
    propagates through both; no overflow is possible, unlike a sum).
    """
    if source.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=source.device)
    lo, hi = torch.aminmax(source)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _real_floating(sources: Sequence[Tensor]) -> Iterator[Tensor]:
    """The non-empty floating sources, complex ones viewed as real (what a finiteness check reads)."""
    for s in sources:
        if s.numel() == 0:
            continue
        if s.is_complex():
            s = torch.view_as_real(s)
        if s.is_floating_point():
            yield s


def all_finite(sources: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the sources' device: True when no source holds a NaN or an infinity.

    One ``aminmax`` per tensor (exact; reads each element once). Complex tensors are viewed as real.
    """
    parts: list[Tensor] = []
    for s in _real_floating(sources):
        parts.extend(torch.aminmax(s))
    if not parts:
        device = sources[0].device if sources else torch.device("cpu")
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack(parts)).all()


def finite_on_host(sources: Sequence[Tensor]) -> bool:
    """True when no element of any source is NaN or infinite, for sources whose values the host may read
    (CPU; on CUDA this would wait for the device, see ``flat_finite`` / ``all_finite``).

    Exact, and cheaper than ``aminmax``: a sum is finite only if every element is (NaN and +-inf
    propagate through every addition, whatever the order), so one sum per tensor, accumulated in at
    least float32, screens them all. A non-finite sum can also be an overflow of large finite values,
    so only then are the tensors checked exactly, one ``aminmax`` each. Measured on a 2-core CPU
    (``benchmarks/profile_update.py``, 2 threads): one sum per tensor costs 4.7 ms on the ResNet-50
    layout and 14.6 ms on the GPT layout, one ``torch._foreach_norm`` call over the same tensors 5.9 and
    20.3 ms, so the loop of sums stays (its Python overhead is small beside the reads of large tensors;
    many small tensors are gathered and checked with one flat sum).
    """
    sums = [s.sum(dtype=torch.float32) if s.element_size() < 4 else s.sum() for s in _real_floating(sources)]
    if not sums:
        return True
    if len(sums) == 1:
        if math.isfinite(float(sums[0])):
            return True
    elif len({x.dtype for x in sums}) == 1:
        if bool(torch.isfinite(torch.stack(sums)).all()):
            return True
    elif all(math.isfinite(float(x)) for x in sums):
        return True
    return all(bool(all_finite([s])) for s in sources)


def nonfinite_indices(sources: Sequence[Tensor]) -> list[int]:
    """Indices of the sources that hold a NaN or an infinity (slow, for error messages)."""
    return [i for i, s in enumerate(sources) if not bool(torch.isfinite(s).all())]


# --- tensor-weight kernels for EMA(capturable=True) ---------------------------------------------------
# The weight is a 0-dim tensor computed on the device, so the same ops run whatever its value (a CUDA
# graph or a torch.compile graph can hold them). A weight of 1 copies the source and 0 leaves the shadow
# unchanged (for finite values; the sign of a zero shadow may flip, -0.0 + 0.0 == +0.0).

HALF_DTYPES = (torch.float16, torch.bfloat16)


def lerp_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a tensor weight that makes ``lerp`` give the bits of ``lerp_(end, python_float)``:
    the kernel's compute dtype, float32 for float16/bfloat16 shadows, else the shadow's own dtype."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def lerp_weighted_(shadow: Tensor, source: Tensor, weight: Tensor) -> None:
    """shadow <- lerp(shadow, source, weight) for a ``weight`` tensor of ``lerp_weight_dtype(shadow.dtype)``
    (0-dim, or broadcasting like ``(K, 1)`` against a ``(K, N)`` shadow).

    Half-precision shadows are lerped in float32 and rounded once, as ``lerp_`` with a Python weight
    does: ``lerp_`` with a tensor weight would round the weight itself to the half dtype first.
    """
    if shadow.dtype in HALF_DTYPES:
        shadow.copy_(torch.lerp(shadow.float(), source.float(), weight))
    else:
        shadow.lerp_(source, weight)


def mask_refused(ok: Tensor, sources: Sequence[Tensor], weights: Tensor) -> tuple[list[Tensor], Tensor]:
    """Where the 0-dim bool ``ok`` is False, zero the sources and the weights: ``lerp(s, 0, 0) == s`` for
    finite ``s``, so a refused update (NaN/inf in a source) changes no shadow. One temporary per source,
    whatever the number of averages (masking the source with each shadow row would take K)."""
    return [torch.where(ok, s, 0.0) for s in sources], torch.where(ok, weights, 0.0)


def lerp_rows_weighted_(flat: Tensor, source: Tensor, weights: Tensor, ok: Tensor | None = None) -> None:
    """``flat[k] <- lerp(flat[k], source, weights[k])`` for a ``(K, N)`` shadow, an ``(N,)`` source and
    ``(K,)`` tensor weights, as one ``lerp_`` over the whole buffer (one in-place op, so ``torch.compile``
    writes the buffer once instead of once per row); a no-op where the 0-dim bool ``ok`` is given and
    False (``mask_refused``)."""
    if source.dtype != flat.dtype or source.device != flat.device:
        source = source.to(device=flat.device, dtype=flat.dtype)
    if ok is not None:
        (source,), weights = mask_refused(ok, [source], weights)
    lerp_weighted_(flat, source, weights.view(-1, 1))


def lerp_lists_weighted_(
    views: Sequence[list[Tensor]], sources: Sequence[Tensor], weights: Tensor, ok: Tensor | None = None
) -> None:
    """``views[k][i] <- lerp(views[k][i], sources[i], weights[k])`` with ``(K,)`` tensor weights, one
    ``_foreach_lerp_`` per average (a loop for half-precision shadows); masked by ``ok`` as above."""
    if not sources:
        return
    srcs = list(sources)
    like = views[0][0]
    if any(s.dtype != like.dtype or s.device != like.device for s in srcs):
        srcs = cast_sources(srcs, like)
    if ok is not None:
        srcs, weights = mask_refused(ok, srcs, weights)
    for k, row in enumerate(views):
        w = weights[k]
        if like.dtype in HALF_DTYPES:
            for v, s in zip(row, srcs):
                lerp_weighted_(v, s, w)
        else:
            torch._foreach_lerp_(row, srcs, [w] * len(row))


# --- the one entry point ------------------------------------------------------------------------------


def lerp_shadows_(
    views: Sequence[list[Tensor]],
    flat: Tensor,
    sources: Sequence[Tensor],
    source: Tensor | None,
    weights: Sequence[float] | Tensor,
    ok: Tensor | None = None,
    *,
    same_dtype: bool = False,
) -> None:
    """``shadow_k <- lerp(shadow_k, weight_source, weights[k])`` for every average k of one shadow group.

    The group is given both ways: ``views[k][i]`` / ``sources[i]`` (per tensor) and the ``(K, N)``
    ``flat`` buffer with ``source``, its live weights as one ``(N,)`` tensor (None: use the per-tensor
    form). ``weights`` are Python floats (the host decided: 1 copies, 0 is never passed) or a ``(K,)``
    tensor of ``lerp_weight_dtype`` (decided on the device: 1 copy, 0 off-step). ``ok``, a 0-dim bool
    tensor never read by the host, makes the whole call a bit-exact no-op where False.
    """
    if isinstance(weights, Tensor):
        if source is None:
            lerp_lists_weighted_(views, sources, weights, ok)
        else:
            lerp_rows_weighted_(flat, source, weights, ok)
        return
    if ok is None:
        if source is None:
            lerp_tensor_major_(views, list(sources), weights, same_dtype=same_dtype)
        else:
            lerp_rows_(flat, source, weights)
        return
    if source is not None:
        masked_lerp_rows_(flat, source, weights, ok)
        return
    for row, w in zip(views, weights):  # each source replaced by the shadow itself where refused
        masked = [torch.where(ok, s.to(device=v.device, dtype=v.dtype), v) for s, v in zip(sources, row)]
        lerp_(row, masked, w)
