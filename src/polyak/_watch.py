"""Has the model changed since the EMA was built? One owner for every way of noticing it.

Checked on every ``update()``, so the common case must cost almost nothing:

* torch calls process-wide registration hooks whenever any module registers a parameter, buffer or
  submodule; they bump a counter (``generation``), and a watch re-walks its model only when it moved;
* ``module.to()``/``.double()`` replace buffers, and FSDP2's ``fully_shard``/FSDP/ZeRO-3 swap parameters,
  by writing a module's ``_buffers``/``_parameters`` dict directly, which fires no hook: the watch
  compares the selected buffers' slots and three parameter slots (first, middle, last) by identity, in
  one C-level pass (``map(dict.get)`` and ``operator.is_not``; no Python bytecode per slot);
* a re-pointed ``p.data`` keeps the tensor object: the source readers (``polyak._readers``) notice it.

On a change, ``verify`` walks the model once: a removed/added/reshaped tensor or a replaced averaged
parameter raises a ValueError saying what to do; a buffer re-assigned with the same shape is rebound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import is_not
from typing import Any

from torch import Tensor, nn

from polyak._select import Selected, select
from polyak._sharding import replaced_message

__all__ = ["ModelWatch"]

_generation = 0
_hooks_installed = False


def _bump_generation(*_: object) -> None:
    global _generation
    _generation += 1


def install_registration_hooks() -> None:
    """Install the process-wide registration hooks once (public ``torch.nn.modules.module`` API)."""
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.nn.modules import module as torch_module

    torch_module.register_module_parameter_registration_hook(_bump_generation)
    torch_module.register_module_buffer_registration_hook(_bump_generation)
    torch_module.register_module_module_registration_hook(_bump_generation)
    _hooks_installed = True


Slot = tuple[dict[str, Any], str, Tensor]


def _slots(model: nn.Module, registry: str, wanted: set[int]) -> list[Slot]:
    """(module's ``registry`` dict, name, tensor) of every tensor in ``wanted`` (ids), model order."""
    slots: list[Slot] = []
    for module in model.modules():
        table: dict[str, Any] = getattr(module, registry)
        slots.extend((table, name, t) for name, t in table.items() if t is not None and id(t) in wanted)
    return slots


@dataclass
class ModelWatch:
    """Watches one model against the tensors selected when the EMA was built."""

    model: nn.Module
    selected: list[Selected]
    probe_all: bool = False  # compare every averaged parameter slot (sharded models: FSDP2 swaps any of them)
    generation: int = -1
    buffer_slots: list[Slot] = field(default_factory=list)
    param_probes: list[Slot] = field(default_factory=list)
    # the watched slots as three parallel lists (dicts, names, tensors), for the one-pass screen
    _tables: list[dict[str, Any]] = field(default_factory=list)
    _names: list[str] = field(default_factory=list)
    _tensors: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        install_registration_hooks()
        self._baseline()

    def _baseline(self) -> None:
        self.generation = _generation
        self.buffer_slots = _slots(self.model, "_buffers", {id(s.tensor) for s in self.selected if s.is_buffer})
        wanted = {id(s.tensor) for s in self.selected if not s.is_buffer and s.mode == "average"}
        probes = _slots(self.model, "_parameters", wanted)
        self.param_probes = (
            probes if len(probes) <= 3 or self.probe_all else [probes[0], probes[len(probes) // 2], probes[-1]]
        )
        slots = self.buffer_slots + self.param_probes
        self._tables = [d for d, _, _ in slots]
        self._names = [n for _, n, _ in slots]
        self._tensors = [t for _, _, t in slots]

    def moved(self) -> bool:
        """The cheap screen: did anything register, or a watched slot change, since the last look?"""
        return self.generation != _generation or any(
            map(is_not, map(dict.get, self._tables, self._names), self._tensors)
        )

    def check(self) -> dict[str, Tensor]:
        """Raise if the model changed in a way the average cannot follow; return the buffers that were
        re-assigned with the same shape (key -> new tensor), which the caller rebinds. Empty and cheap
        when nothing moved."""
        if not self.moved():
            return {}
        rebound = self.verify(strict_identity=True)
        self._baseline()
        return rebound

    def verify(self, *, strict_identity: bool) -> dict[str, Tensor]:
        """Walk the model: raise a clear error if its tensors no longer match the selection, return the
        re-assigned tensors of the same shape (and update the selection to them)."""
        now = {s.key: s for s in select(self.model, include=None, exclude=None, buffers="copy")}
        before = {s.key: s for s in self.selected}
        missing = sorted(set(before) - set(now))
        unexpected = sorted(set(now) - set(before))
        if missing or unexpected:
            raise ValueError(
                "the model changed after the EMA was built: "
                f"removed {missing[:20]}, added {unexpected[:20]}; build the EMA after the model is final "
                "(after replacing layers, before training)"
            )
        rebound: dict[str, Tensor] = {}
        for key, old in before.items():
            new = now[key].tensor
            if tuple(new.shape) != old.shape:
                raise ValueError(
                    f"the model changed after the EMA was built: {key!r} has shape {tuple(new.shape)}, "
                    f"the average has {old.shape}"
                )
            if new is not old.tensor:
                specific = None if old.is_buffer or old.mode != "average" else replaced_message(key, old.tensor, new)
                if specific is not None:  # FSDP2's sharded <-> unsharded parameters, whatever strict_identity
                    raise ValueError(specific)
                if not old.is_buffer and strict_identity and old.mode == "average":
                    raise ValueError(
                        f"the model changed after the EMA was built: parameter {key!r} was replaced by a new "
                        "tensor (wrapping the model in FSDP2's fully_shard, FSDP or DeepSpeed ZeRO-3 does this); "
                        "build the EMA after the model is final, or copy new weights in place "
                        "(param.copy_(...)) instead of re-assigning"
                    )
                rebound[key] = new
        if rebound:
            self.selected[:] = [
                Selected(s.key, s.model_keys, rebound.get(s.key, s.tensor), s.is_buffer, s.mode, s.shape)
                for s in self.selected
            ]
        return rebound
