"""Pure update functions over lists of tensors (shadow views and live sources).

Every function here is stateless: it reads and writes the tensors it is given and returns nothing it
does not compute. The reference arithmetic is ``shadow.lerp_(source.to(shadow.dtype), 1 - beta)``;
every faster path must give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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


def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """target <- source (casting dtype/device) for every pair, in one foreach call."""
    if targets:
        torch._foreach_copy_(list(targets), list(sources))


def all_finite(sources: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the sources' device: True when no source holds a NaN or an infinity.

    ``sum |x|`` per tensor is NaN for a NaN and inf for an infinity. It can also overflow to inf for
    finite values beyond ~1e38 / numel: callers confirm a False with ``nonfinite_indices`` before acting.
    """
    sums = torch._foreach_norm(list(sources), 1.0)
    return torch.isfinite(torch.stack(sums)).all()


def nonfinite_indices(sources: Sequence[Tensor]) -> list[int]:
    """Indices of the sources that hold a NaN or an infinity (slow, for error messages)."""
    return [i for i, s in enumerate(sources) if not bool(torch.isfinite(s).all())]
