"""The EMA's bookkeeping as one record, advanced by one function, on the host or on the device.

``Counters`` holds, per EMA: the call count ``step``, per average the debias product
``prod(beta)`` over every accepted averaging update (1.0 is the empty product; a copy counts as
beta = 0) and the decays of the last accepted update, and the refused updates (count and the step of
the latest). ``advance(counters, decision, ok)`` is the one rule that moves them, in the manner of optax's
``apply_if_finite``: an accepted copy or averaging update folds its decays in, a refused one (``ok``
False) is counted instead, and nothing is ever changed first and undone later.

The same function runs on host numbers (``ok`` a bool, the shadows on CPU) and on device tensors
(``ok`` a 0-dim bool tensor that is never read by the host during ``update()``: the CUDA check and
``EMA(capturable=True)``); ``DeviceCounters`` keeps the tensors in place so a captured CUDA graph keeps
pointing at them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from polyak._decide import Decision, TensorDecision

__all__ = ["Counters", "DeviceCounters", "Ledger", "advance", "compute_dtype", "refusal_message"]


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 for decays and products, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class Counters:
    """The bookkeeping of an EMA: host numbers, or (``DeviceCounters.view``) device tensors."""

    step: Any  # int, or an int64 () tensor: calls of update()
    products: Any  # tuple[float, ...], or a (K,) tensor: prod(beta) per average (debias)
    last_decays: Any  # tuple[float, ...], or a (K,) tensor: the decays of the last accepted update
    refused: Any  # int, or an int64 () tensor: updates refused by the finiteness check
    last_refused: Any  # int, or an int64 () tensor: the step of the latest refused update

    @classmethod
    def fresh(cls, num_averages: int) -> Counters:
        return cls(0, (1.0,) * num_averages, (0.0,) * num_averages, 0, 0)


def _where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def _times(products: Any, factors: Any) -> Any:
    if isinstance(products, Tensor):
        return products * factors
    return tuple(p * f for p, f in zip(products, factors))


def _vector(values: tuple[float, ...], like: Any) -> Any:
    """Host floats as ``like``'s kind: a tuple, or a tensor on ``like``'s device (no wait for it)."""
    if not isinstance(like, Tensor):
        return values
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)


def advance(c: Counters, d: Decision | TensorDecision, ok: bool | Tensor) -> Counters:
    """The counters after one call of ``update()`` that did ``d`` with finiteness verdict ``ok``.

    ``step`` always moves; an accepted copy sets every product and last decay to 0; an accepted
    averaging update multiplies the products by its decays and records them; a refused active update
    changes neither and is counted in ``refused`` (``last_refused`` = this step); an off-step changes
    nothing else. Pure on host numbers; elementwise ``torch.where`` on device tensors (no host read).
    """
    step = c.step + 1
    active: Any = d.copy | d.averaging
    refused: Any
    if isinstance(ok, Tensor):
        accepted, refused = active & ok, active & ~ok
    elif ok:
        accepted, refused = active, False
    else:
        accepted, refused = False, active
    if isinstance(d, TensorDecision):
        factor = torch.where(d.copy, 0.0, torch.where(d.averaging, d.decays, 1.0))
        last = torch.where(d.copy, 0.0, d.decays)
    else:
        factor = _vector(d.decays if d.averaging else tuple(0.0 if d.copy else 1.0 for _ in d.decays), c.products)
        last = _vector(d.decays, c.products)  # a copy's decays are 0.0
    return Counters(
        step=step,
        products=_where(accepted, _times(c.products, factor), c.products),
        last_decays=_where(accepted, last, c.last_decays),
        refused=c.refused + refused.to(torch.int64)
        if isinstance(refused, Tensor)
        else c.refused + 1
        if refused
        else c.refused,
        last_refused=_where(refused, step, c.last_refused) if refused is not False else c.last_refused,
    )


@dataclass
class DeviceCounters:
    """``Counters`` as tensors on one device, updated in place only (a captured CUDA graph keeps
    pointing at them, also across ``load``). ``reported``: refusals the host has already acted on."""

    step: Tensor
    products: Tensor
    last_decays: Tensor
    refused: Tensor
    last_refused: Tensor
    reported: int = 0
    # (refused, last_refused) on their way to the host, and the CUDA event that marks their arrival
    _in_flight: tuple[Tensor, Any] | None = None

    @classmethod
    def create(cls, device: torch.device, num_averages: int) -> DeviceCounters:
        dtype = compute_dtype(device)
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            products=torch.ones(num_averages, dtype=dtype, device=device),
            last_decays=torch.zeros(num_averages, dtype=dtype, device=device),
            refused=torch.zeros((), dtype=torch.int64, device=device),
            last_refused=torch.zeros((), dtype=torch.int64, device=device),
        )

    def view(self) -> Counters:
        return Counters(self.step, self.products, self.last_decays, self.refused, self.last_refused)

    def advance_(self, d: Decision | TensorDecision, ok: bool | Tensor) -> None:
        """``advance`` written back in place."""
        new = advance(self.view(), d, ok)
        for name in ("step", "products", "last_decays", "refused", "last_refused"):
            target: Tensor = getattr(self, name)
            value = getattr(new, name)
            if value is not target:
                target.copy_(value)

    def start_refusal_copy(self) -> None:
        """Start copying (refused, last_refused) to pinned host memory without waiting for the device, so
        a later ``landed_refusals`` can act on them for free (``EMA(capturable=False)`` on CUDA)."""
        packed = torch.stack([self.refused, self.last_refused])
        if packed.device.type != "cuda":
            self._in_flight = (packed, None)
            return
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._in_flight = (host, event)

    def landed_refusals(self) -> tuple[int, int] | None:
        """(refused, last_refused) from the latest copy if it has reached the host, else None."""
        if self._in_flight is None:
            return None
        host, event = self._in_flight
        if event is not None and not event.query():
            return None
        refused, last = host.tolist()
        return int(refused), int(last)

    def read(self) -> Counters:
        """The counters on the host: one transfer, one sync."""
        k = self.products.numel()
        packed = torch.cat(
            [
                self.step.reshape(1).to(torch.float64),
                self.refused.reshape(1).to(torch.float64),
                self.last_refused.reshape(1).to(torch.float64),
                self.products.to(torch.float64),
                self.last_decays.to(torch.float64),
            ]
        ).tolist()
        return Counters(
            int(packed[0]), tuple(packed[3 : 3 + k]), tuple(packed[3 + k :]), int(packed[1]), int(packed[2])
        )

    def load(self, step: int, products: Sequence[float], last_decays: Sequence[float]) -> None:
        """Overwrite the counters in place (a new run: no refusals pending)."""
        self.step.fill_(step)
        self.products.copy_(torch.tensor([float(p) for p in products], dtype=torch.float64))
        self.last_decays.copy_(torch.tensor([float(d) for d in last_decays], dtype=torch.float64))
        self.refused.zero_()
        self.last_refused.zero_()
        self.reported = 0
        self._in_flight = None


@dataclass
class Ledger:
    """One EMA's counters where they live: the host record ``host``, and ``device`` when the counters live
    on the device (``capturable=True``, or a CUDA model with the NaN check), which then holds the truth;
    ``host`` is refreshed by ``poll(block=True)``. Without ``capturable`` the host counts the calls itself
    (``host.step`` is the truth), so ``update()`` decides from a host step with no device read."""

    host: Counters
    device: DeviceCounters | None = None
    capturable: bool = False

    def read(self) -> Counters:
        """The counters on the host (a sync when they live on the device; refusals not acted on)."""
        if self.device is None:
            return self.host
        read = self.device.read()
        return read if self.capturable else replace(read, step=self.host.step)

    def set(self, **values: Any) -> None:
        """Overwrite counters (a load): on the host, and in place on the device; no refusal pending."""
        self.host = replace(self.read(), refused=0, last_refused=0, **values)
        if self.device is not None:
            self.device.load(self.host.step, self.host.products, self.host.last_decays)

    def advance(self, decision: Decision | TensorDecision, ok: bool | Tensor) -> None:
        """``advance`` where the counters live (a device flag ``ok`` also starts the refusal copy)."""
        if self.device is None:
            self.host = advance(self.host, decision, ok)
            return
        self.device.advance_(decision, ok)
        if not self.capturable:
            self.host = replace(self.host, step=self.host.step + 1)
            if isinstance(ok, Tensor):
                self.device.start_refusal_copy()

    def unreported(self, *, block: bool) -> tuple[int, int]:
        """``(count, last step)`` of the refusals counted on the device that the host has not acted on yet,
        now marked reported: all of them, waiting for the device, when ``block``; else only what an
        earlier copy already brought over. ``(0, 0)`` when there are none (or no device counters)."""
        state = self.device
        if state is None:
            return 0, 0
        if block:
            self.host = self.read()
            refused, last = int(self.host.refused), int(self.host.last_refused)
        else:
            landed = state.landed_refusals()
            if landed is None:
                return 0, 0
            refused, last = landed
        if refused <= state.reported:
            return 0, 0
        count, state.reported = refused - state.reported, refused
        return count, last


def refusal_message(bad: list[str] | None, step: int, count: int) -> tuple[str, str]:
    """(when, where) of ``count`` refused updates, the last at ``step``; ``bad`` names the tensors, or
    is None when the check ran on the device (tensors not identified)."""
    where = (
        f"in {len(bad)} weight tensor(s): {bad[:10]}{' ...' if len(bad) > 10 else ''}"
        if bad is not None
        else "in the weights (checked on the device without naming the tensors)"
    )
    at = f"update step {step}" if count == 1 else f"{count} updates, the last at update step {step}"
    return at, where
