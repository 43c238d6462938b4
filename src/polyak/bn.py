"""Recompute BatchNorm statistics for averaged weights.

Averaged weights with the running statistics of the raw model (or averaged statistics, which are not the
statistics of the averaged weights) evaluate worse than they should; SWA (Izmailov et al. 2018) fixes this
by one pass over training data in train mode with a cumulative average (``momentum=None``). This is
``torch.optim.swa_utils.update_bn``, made to work inside ``with ema.apply():`` (which restores the live
model's statistics on exit) and on models whose batches are tuples, lists or dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["update_bn"]


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("input", "inputs", "x", "pixel_values", "input_ids"):
            if key in batch:
                return batch[key]
        raise ValueError(
            f"update_bn: cannot tell the input from a batch with keys {sorted(batch)}; pass forward=lambda m, b: m(...)"
        )
    return batch


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Reset every BatchNorm layer's running statistics and recompute them as the exact average over
    ``loader`` (``momentum=None``), in train mode; every module's mode and every momentum are restored.

    Args:
        loader: batches; a tuple/list batch feeds its first element, a dict its ``input``/``x``/... entry.
        model: the model holding the averaged weights (typically inside ``with ema.apply():``).
        device: move each batch there first.
        num_batches: stop after this many batches (default: the whole loader).
        forward: ``forward(model, batch)`` for models that take batches some other way.

    Returns the number of batches seen; 0 when the model has no BatchNorm layer (nothing is run).
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, not only the top one
    dev = torch.device(device) if device is not None else None
    saved = [(b, b.clone()) for m in layers for b in m.buffers(recurse=False)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.train()
        for batch in loader:
            if num_batches is not None and seen >= num_batches:
                break
            batch = _to(batch, dev)
            if forward is not None:
                forward(model, batch)
            else:
                model(_first_input(batch))
            seen += 1
    finally:
        for m in layers:
            m.momentum = momenta[m]
        for module, training in modes:
            module.training = training
    if seen == 0:
        for buf, value in saved:
            buf.copy_(value)
        raise ValueError("update_bn: the loader yielded no batch; the BatchNorm statistics were left as they were")
    return seen
