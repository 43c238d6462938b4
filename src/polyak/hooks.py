"""Optimizer step hooks that update an average: one registry, at most one hook per average.

``EMA.attach(optimizer)`` and ``polyak.integrations.loop.update_on_step(ema, optimizer)`` both register
here, so a second registration of the same average (through either name, on the same optimizer or on
another one) is refused: two hooks would fold every ``optimizer.step()`` into the average twice. The
hook is ``torch.optim.Optimizer.register_step_post_hook``, so steps that ``torch.amp.GradScaler`` skips
are not averaged. The registry holds nothing strongly: an optimizer or an average that goes out of scope
is freed, and its hook with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

__all__ = ["StepHook", "attached", "register", "unregister"]

T = TypeVar("T")

# average -> its one step hook (weak on both sides: a hook holds its average, so the value is a weakref)
_registry: weakref.WeakKeyDictionary[Any, weakref.ReferenceType[StepHook[Any]]] = weakref.WeakKeyDictionary()


class StepHook(Generic[T]):
    """The handle ``EMA.attach`` and ``update_on_step`` return: ``remove()`` (or leaving a ``with`` block,
    or ``ema.detach()``) stops the updates. Removing twice is harmless."""

    def __init__(self, ema: T, optimizer: torch.optim.Optimizer, update: Callable[[], object]) -> None:
        self.ema = ema
        self._update = update
        self._optimizer_ref = weakref.ref(optimizer)
        self._removed = False
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._update()

    @property
    def active(self) -> bool:
        """True while ``optimizer.step()`` still updates the average through this hook."""
        return not self._removed and self._optimizer_ref() is not None

    def remove(self) -> None:
        """Stop updating the average after optimizer steps."""
        self._handle.remove()
        self._removed = True
        current = _registry.get(self.ema)
        if current is not None and current() is self:
            del _registry[self.ema]

    def __enter__(self) -> StepHook[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"StepHook(active={self.active}, ema={self.ema!r})"


def attached(ema: object) -> StepHook[Any] | None:
    """The active step hook of ``ema``, or None."""
    ref = _registry.get(ema)
    hook = None if ref is None else ref()
    return hook if hook is not None and hook.active else None


def register(ema: T, optimizer: object, update: Callable[[], object]) -> StepHook[T]:
    """Call ``update()`` after every ``optimizer.step()``; refuse a second hook for the same ``ema``.

    Raises TypeError when ``optimizer`` is not a ``torch.optim.Optimizer``, RuntimeError when ``ema``
    already has an active hook (from ``EMA.attach`` or ``update_on_step``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expects a torch.optim.Optimizer as optimizer, got {type(optimizer).__name__}")
    if attached(ema) is not None:
        raise RuntimeError(
            "this EMA is already attached to an optimizer (by ema.attach or update_on_step): a second step hook "
            "would update it twice per optimizer step. Call ema.detach() or handle.remove() first; for a model "
            "stepped by several optimizers, attach to the one that steps last."
        )
    hook = StepHook(ema, optimizer, update)
    _registry[ema] = weakref.ref(hook)
    return hook


def unregister(ema: object) -> None:
    """Remove the step hook of ``ema`` (a no-op when it has none)."""
    hook = attached(ema)
    if hook is not None:
        hook.remove()
