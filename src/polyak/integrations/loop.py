"""Plain training loops: update an ``EMA`` after every ``optimizer.step()`` through the optimizer's own
step hook, so the loop body needs no extra line.

    ema = EMA(model, decay=0.999)
    handle = update_on_step(ema, optimizer)   # ema.update() now runs after each optimizer.step()
    ...
    handle.remove()                           # stop updating

Because the hook fires only when ``optimizer.step()`` actually runs, steps that
``torch.amp.GradScaler.step`` skips on inf/NaN gradients are not folded into the average, and gradient
accumulation counts optimizer steps, not batches. This is the same hook as ``ema.attach(optimizer)``:
an EMA has at most one, whichever name installed it.
"""

from __future__ import annotations

import torch

from polyak.ema import EMA
from polyak.hooks import StepHook

__all__ = ["EMAStepHook", "update_on_step"]

EMAStepHook = StepHook
"""The handle :func:`update_on_step` returns (``polyak.hooks.StepHook``)."""


def update_on_step(ema: EMA, optimizer: torch.optim.Optimizer) -> StepHook[EMA]:
    """Call ``ema.update()`` after every ``optimizer.step()`` (``Optimizer.register_step_post_hook``);
    the same as ``ema.attach(optimizer)``.

    Returns a handle whose ``remove()`` stops the updates. An EMA that already has a step hook (from
    ``update_on_step`` or ``ema.attach``, on this optimizer or another) raises a RuntimeError: it would
    average every step twice. For a model trained by several optimizers (one per part), attach to the one
    that steps last, or call ``ema.update()`` yourself.
    """
    if not isinstance(ema, EMA):
        raise TypeError(f"update_on_step expects a polyak.EMA as ema, got {type(ema).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"update_on_step expects a torch.optim.Optimizer as optimizer, got {type(optimizer).__name__}")
    hook: StepHook[EMA] = ema.attach(optimizer)
    return hook
