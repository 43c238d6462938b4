"""The shadow groups' side of one update: plan each group's reader, follow the model, read, lerp.

Functions over ``polyak._layout.Group`` lists, so the facade holds the groups and calls these in the
order of ``docs/architecture.md``: ``follow`` (rebind re-assigned tensors, re-plan the readers that
moved), ``read`` (every group's flat source; nothing written yet), ``lerp_`` (the one weighted-lerp
family of ``polyak._kernels``, with the device flag ``ok`` as a mask).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from polyak import _kernels
from polyak._layout import Group
from polyak._readers import plan_reader

__all__ = ["follow", "lerp_", "plan", "read"]

log = logging.getLogger("polyak")


def plan(group: Group, *, num_averages: int, nonfinite: str, capturable: bool) -> None:
    """Choose ``group``'s reader (``polyak._readers.plan_reader``). With the check on the device (CUDA,
    or capturable) the update is masked on the device, which needs a flat source."""
    check = nonfinite != "ignore"
    group.reader = plan_reader(
        group.sources,
        group.dtype,
        group.device,
        num_averages=num_averages,
        check=check,
        force_gather=(group.device.type == "cuda" or capturable) and check,
        order=group.order,
    )


def follow(groups: Sequence[Group], rebound: dict[str, Tensor]) -> list[Group]:
    """Rebind the re-assigned sources (``rebound``: key -> the tensor the engine now reads) and return
    the groups whose reader must be planned again (rebound, or ``reader.moved()``: a re-pointed ``p.data``);
    a ValueError, before anything is written, where a source no longer has its shadow's shape."""
    stale = []
    for group in groups:
        if rebound:
            group.sources = [rebound.get(k, src) for k, src in zip(group.keys, group.sources)]
        elif not group.reader.moved():
            continue
        for key, src, view in zip(group.keys, group.sources, group.views[0]):
            if src.shape != view.shape:
                raise ValueError(
                    f"the model changed after the EMA was built: {key!r} has shape {tuple(src.shape)}, "
                    f"the average has {tuple(view.shape)}"
                )
        if group.plan == "flat":
            log.warning(
                "polyak: a tensor of an EMA(flatten=True) model was re-assigned (e.g. by model.to(), "
                ".half() or p.data = ...); it is no longer a view of the flat buffer, so this EMA now reads "
                "the tensors one by one (slower, same result)"
            )
        stale.append(group)
    return stale


def read(groups: Sequence[Group], compiling: bool) -> list[Tensor | None]:
    """Every group's flat source (None: per-tensor). Under ``torch.compile`` (capturable), for real
    floating sources on the shadow's device: a plain ``cat`` of the live tensors, which inductor fuses
    into the lerp (no scratch copy, and no cached view left stale by a re-assigned parameter)."""
    out: list[Tensor | None] = []
    for group in groups:
        if compiling and all(s.is_floating_point() and s.device == group.device for s in group.sources):
            out.append(torch.cat([group.sources[i].detach().reshape(-1).to(group.dtype) for i in group.order]))
        else:
            out.append(group.reader.read())
    return out


def lerp_(
    groups: Sequence[Group], sources: Sequence[Tensor | None], weights: Sequence[float] | Tensor, ok: bool | Tensor
) -> None:
    """``shadow.lerp_(source, weight)`` for every average of every group (``_kernels.lerp_shadows_``):
    float weights decided on the host, or a (K,) weight tensor; a device flag ``ok`` masks the update."""
    for group, src in zip(groups, sources):
        gok = ok.to(group.flat.device) if isinstance(ok, Tensor) else None
        gweights = weights
        if isinstance(weights, Tensor):
            gweights = weights.to(device=group.device, dtype=_kernels.lerp_weight_dtype(group.dtype))
        _kernels.lerp_shadows_(
            group.views, group.flat, group.sources, src, gweights, gok, same_dtype=group.reader.same_dtype
        )
