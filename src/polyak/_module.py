"""The average as an ``nn.Module`` whose tensors are the shadow views (``EMA.module``, ``Teacher``).

The module tree is copied with ``copy.deepcopy`` and a memo that already holds a substitute for every
tensor of the model's state, so deepcopy copies the Python objects (modules, hooks, attributes) and never
a tensor, and the model's ``__init__`` does not run again. Tied tensors stay tied (one memo entry).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from polyak._select import Selected

__all__ = ["averaged_module", "check_shadows_shareable", "unwrap"]


def check_shadows_shareable(split: str | None, *, debias: bool) -> None:
    """A ValueError saying what to use instead where ``EMA.module()`` cannot share the shadows: each rank
    holds only a part of them (``split`` says which, ``polyak._placement``), or they are not the average
    (``debias=True``)."""
    if split is not None:
        raise ValueError(
            f"ema.module() builds a module over the shadows, but this EMA averages {split}"
            ": each rank holds only its local part. Evaluate with `with ema.apply():` (the averaged weights "
            "are gathered into the model), or get the full average with ema.averaged_state_dict(full=True) "
            "and load it into a copy of the model"
        )
    if debias:
        raise ValueError(
            "ema.module() shares the shadow storage, but with debias=True the shadows are not the average "
            "(it is shadow / (1 - prod(beta))); use ema.copy_to(model_copy) or ema.averaged_state_dict()"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def averaged_module(
    model: nn.Module,
    averaged: Mapping[str, Tensor],
    selected: Sequence[Selected],
    *,
    own_buffers: bool = False,
) -> nn.Module:
    """A frozen, eval-mode copy of ``unwrap(model)`` whose tensors are substitutes, never copies:

    - a tensor with an average (``averaged[selected.key]``): the shadow view itself;
    - a buffer under ``"skip"``, or any buffer without an average when ``own_buffers``: a clone;
    - anything else (excluded parameters, integer and ``"copy"`` buffers, non-persistent buffers): the
      live tensor itself (detached).

    Parameters become ``nn.Parameter(substitute, requires_grad=False)``, which shares the storage.
    """
    inner = unwrap(model)
    memo: dict[int, object] = {}
    with torch.no_grad():
        for s in selected:
            value = averaged.get(s.key)
            if value is None:
                own = s.is_buffer and (s.mode == "skip" or own_buffers)
                value = s.tensor.detach().clone() if own else s.tensor.detach()
            memo[id(s.tensor)] = value if s.is_buffer else nn.Parameter(value, requires_grad=False)
        for module in inner.modules():  # non-persistent buffers (e.g. cached constants): shared or owned
            for buf in module._buffers.values():
                if buf is not None and id(buf) not in memo:
                    memo[id(buf)] = buf.detach().clone() if own_buffers else buf.detach()
            for param in module._parameters.values():  # not in the state (cannot happen, but never copy)
                if param is not None and id(param) not in memo:
                    memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    clone = copy.deepcopy(inner, memo)
    clone.eval()
    return clone
