"""What the Lightning and Hugging Face callbacks share: building the EMA (same default decay as
``polyak.EMA``), checking the index and warm-up arguments, deciding when the average is evaluated, and
holding the averaged weights swapped in across trainer events.

Only public names of ``polyak`` are used here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from torch import Tensor, nn

from polyak._validate import as_int
from polyak.ema import EMA, DecayLike

__all__ = [
    "AveragedSwap",
    "build_ema",
    "check_index",
    "check_start",
    "is_sharded",
    "is_warm",
    "one_file_state",
    "rank0_says",
    "wait_for_all",
]


def build_ema(model: nn.Module, decay: DecayLike | Sequence[DecayLike] | None, index: int, **ema_kwargs: Any) -> EMA:
    """``polyak.EMA(model, decay, **ema_kwargs)``; ``decay=None`` takes ``EMA``'s own default, so a callback
    and a plain ``EMA(model)`` average alike. Fails now on an ``index`` out of range, not at the first
    evaluation."""
    ema = EMA(model, **ema_kwargs) if decay is None else EMA(model, decay=decay, **ema_kwargs)
    ema.check_index(index)
    return ema


def check_index(index: Any) -> int:
    """``index`` as an int (numpy integers accepted), checked before there is an EMA to check its range
    (``EMA.check_index`` does that in ``build_ema``)."""
    return as_int(index, "index")


def check_start(value: Any, name: str) -> int:
    """A warm-up threshold (``eval_start_step``, ``eval_start_epoch``): an int >= 0."""
    return as_int(value, name, minimum=0)


def is_warm(ema: EMA | None, step: int, eval_start_step: int, epoch: int = 0, eval_start_epoch: int = 0) -> bool:
    """Whether the average is evaluated: it exists, has seen an update, and the trainer has reached
    ``eval_start_step`` (optimizer steps) and ``eval_start_epoch``. Before that the live weights are
    evaluated (a cold average is mostly the initial weights)."""
    return ema is not None and ema.step > 0 and step >= eval_start_step and epoch >= eval_start_epoch


def _is_shard(value: object) -> bool:
    """A rank's part of an averaged tensor: a DTensor (FSDP2, tensor parallelism) or a rank's slice of a
    replicated average (``EMA(..., shard=True)``); both gather the whole with ``full_tensor()``."""
    return isinstance(value, Tensor) and type(value) is not Tensor and callable(getattr(value, "full_tensor", None))


def is_sharded(state: Any) -> bool:
    """Whether an EMA state (``ema.state_dict()``) holds shards: each rank keeps its own part of the
    averages, and gathering them is a collective."""
    if isinstance(state, Mapping):
        return any(is_sharded(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(is_sharded(v) for v in state)
    return _is_shard(state)


def one_file_state(state: dict[str, Any]) -> dict[str, Any]:
    """``ema.state_dict()`` made fit for a checkpoint that rank 0 alone writes (Lightning's, whatever its
    strategy): every shard is gathered (``full_tensor()``), one tensor at a time, into a full CPU tensor
    on rank 0.

    A collective for a sharded state: every rank must call it (the other ranks keep their shards, which
    nobody writes). A state without shards is returned as it is. A full state loads into a sharded EMA
    (each rank takes its part) and into a plain single-process one."""
    if not is_sharded(state):
        return state
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def gather(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: gather(v) for k, v in value.items()}
        if isinstance(value, list):
            return [gather(v) for v in value]
        if _is_shard(value):
            full: Tensor = value.full_tensor()  # an all-gather
            return full.cpu() if rank0 else value
        return value

    return {k: gather(v) for k, v in state.items()}


def rank0_says(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast that every rank must make; ``flag`` itself without a
    process group). Used where the ranks must agree before a collective, e.g. on whether the checkpoint
    directory that rank 0 writes into exists."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def wait_for_all() -> None:
    """A barrier over the default process group (nothing without one): after a save that rank 0 writes
    alone, no rank goes on before the file is complete."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class AveragedSwap:
    """Holds ``ema.apply(index)`` open from one trainer event to another: ``swap_in`` puts the averaged
    weights into the model (once; a second call while in is a no-op), ``swap_out`` restores the live
    weights (a no-op when they are in)."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.active = False

    def swap_in(self, ema: EMA, index: int) -> None:
        if self.active:
            return
        self._stack.enter_context(ema.apply(index))
        self.active = True

    def swap_out(self) -> None:
        if not self.active:
            return
        self.active = False
        self._stack.close()
