"""Plain training loops: update an ``EMA`` after every ``optimizer.step()`` through the optimizer's own
step hook, so the loop body needs no extra line.

    ema = EMA(model, decay=0.999)
    handle = update_on_step(ema, optimizer)   # ema.update() now runs after each optimizer.step()
    ...
    handle.remove()                           # stop updating

Because the hook fires only when ``optimizer.step()`` actually runs, steps that
``torch.amp.GradScaler.step`` skips on inf/NaN gradients are not folded into the average, and gradient
accumulation counts optimizer steps, not batches.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from polyak.ema import EMA

__all__ = ["EMAStepHook", "update_on_step"]

# (optimizer -> EMAs attached to it): refuses a second registration of the same pair, which would update
# the average twice per step. Weak on both sides so that nothing here keeps a model or optimizer alive.
_attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet[EMA]] = weakref.WeakKeyDictionary()


class EMAStepHook:
    """The handle returned by :func:`update_on_step`; ``remove()`` (or leaving a ``with`` block) stops the
    updates. Removing twice is harmless."""

    def __init__(self, ema: EMA, optimizer: torch.optim.Optimizer) -> None:
        self.ema = ema
        self._optimizer_ref = weakref.ref(optimizer)
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.ema.update()

    @property
    def active(self) -> bool:
        """True until ``remove()`` is called."""
        optimizer = self._optimizer_ref()
        return optimizer is not None and self.ema in _attached.get(optimizer, ())

    def remove(self) -> None:
        """Stop updating the EMA after optimizer steps."""
        self._handle.remove()
        optimizer = self._optimizer_ref()
        if optimizer is not None and optimizer in _attached:
            _attached[optimizer].discard(self.ema)

    def __enter__(self) -> EMAStepHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"EMAStepHook(active={self.active}, ema={self.ema!r})"


def update_on_step(ema: EMA, optimizer: torch.optim.Optimizer) -> EMAStepHook:
    """Call ``ema.update()`` after every ``optimizer.step()`` (``Optimizer.register_step_post_hook``).

    Returns a handle whose ``remove()`` stops the updates. Attaching the same EMA to the same optimizer
    twice raises a ValueError (it would average every step twice). For a model trained by several
    optimizers (one per part), attach to the one that steps last, or call ``ema.update()`` yourself.
    """
    if not isinstance(ema, EMA):
        raise TypeError(f"update_on_step expects a polyak.EMA as ema, got {type(ema).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"update_on_step expects a torch.optim.Optimizer as optimizer, got {type(optimizer).__name__}")
    emas = _attached.setdefault(optimizer, weakref.WeakSet())
    if ema in emas:
        raise ValueError(
            "this EMA is already updated by this optimizer's step hook; attaching it again would update it twice "
            "per step. Call .remove() on the first handle before attaching again."
        )
    hook = EMAStepHook(ema, optimizer)
    emas.add(ema)
    return hook
