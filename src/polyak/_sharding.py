"""Sharded averages: each rank averages its own part of every sharded tensor, with no collective.

A model whose parameters are DTensors (FSDP2's ``fully_shard``, tensor parallelism, HSDP) holds one
local shard per rank behind a global shape. The EMA keeps shadows of the local shards only and runs the
same readers and kernels over them (torchtitan's EMA and DINOv2 average FSDP shards the same way), so an
update issues no collective. Where a full tensor or a distributed checkpoint is wanted, the placement of
each averaged tensor says how to get there.

The seam (``Placement``): one small object per averaged key, recorded when the EMA is built, that knows

* ``local(live)``: the part of the live tensor this rank reads and writes (no collective);
* ``stamp(live)``: an object that is replaced when that part is re-pointed (compared by identity);
* ``wrap(local)``: the state value of a local average, loadable by ``torch.distributed.checkpoint``
  (no collective);
* ``gather(local)``: the full tensor (a collective over the placement's ranks);
* ``take(full)``: this rank's part of a full tensor (no collective);
* ``accept(key, value)``: a loaded state value (its own wrapped form, or a full tensor) as the local
  tensor to copy into the shadow.

``DTensorPlacement`` implements it for DTensors; ``Shards`` holds the placements of one EMA and follows
FSDP2 when it re-points a local shard (its lazy initialisation, a state-dict load). ``torch.distributed``
is imported only when a DTensor exists (``torch.distributed.tensor`` already imported).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from operator import is_not
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from polyak._rank_shard import FlatRangeShard
from polyak._select import Selected, normalize_key

__all__ = [
    "DTensorPlacement",
    "Placement",
    "Shards",
    "agree",
    "full_items",
    "is_dtensor",
    "is_sharded",
    "local_pairs",
    "replaced_message",
    "reshard",
    "shards_of",
]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a sharded state value whose ``full_tensor()`` gathers it (a collective): a DTensor,
    or a rank's flat range of a rank-sharded average (``polyak._rank_shard.FlatRangeShard``)."""
    return isinstance(t, FlatRangeShard) or is_dtensor(t)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (False, with nothing imported, when DTensors were never imported)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Placement(Protocol):
    """Where one averaged tensor lives across ranks (see the module docstring)."""

    def local(self, live: Tensor) -> Tensor: ...

    def stamp(self, live: Tensor) -> object: ...

    def wrap(self, local: Tensor) -> Tensor: ...

    def gather(self, local: Tensor) -> Tensor: ...

    def take(self, full: Tensor) -> Tensor: ...

    def accept(self, key: str, value: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class DTensorPlacement:
    """A DTensor's mesh, placements, global shape and global stride, recorded when the EMA is built.

    The global shape and stride are kept, never inferred from the local shards: ``DTensor.from_local``
    without ``shape=`` guesses them from the local shape, which is wrong for uneven shards.
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: Tensor) -> DTensorPlacement:
        return cls(tensor.device_mesh, tuple(tensor.placements), tuple(tensor.shape), tuple(tensor.stride()))  # type: ignore[attr-defined]

    def local(self, live: Tensor) -> Tensor:
        """The local shard itself (``to_local()`` under no_grad returns the stored tensor, no copy)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return live.to_local()  # type: ignore[attr-defined,no-any-return]
        return live.to_local()  # type: ignore[attr-defined,no-any-return]

    def stamp(self, live: Tensor) -> object:
        """The DTensor's stored local tensor, which FSDP2 re-assigns when it re-points a shard
        (``reset_sharded_param``). ``to_local()`` of a ``Parameter(DTensor)`` is a fresh view on every call
        (torch 2.13), so it cannot serve; where the attribute is missing the fresh view is returned, and the
        EMA then re-reads the local shards on every update (correct, slower)."""
        stored = getattr(live, "_local_tensor", None)
        return stored if stored is not None else self.local(live)

    def wrap(self, local: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=torch.Size(self.shape), stride=self.stride
        )

    def gather(self, local: Tensor) -> Tensor:
        """The full tensor: an all-gather over the mesh that every rank of it must call."""
        return self.wrap(local).full_tensor()  # type: ignore[attr-defined,no-any-return]

    def take(self, full: Tensor) -> Tensor:
        """This rank's part of a full tensor (``distribute_tensor`` with ``src_data_rank=None``: each rank
        splits its own copy, no collective)."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.detach(), self.mesh, self.placements, src_data_rank=None).to_local()

    def accept(self, key: str, value: Tensor) -> Tensor:
        """The local tensor to load from ``value``: a DTensor on this mesh (redistributed if its placements
        differ: a collective), or a full tensor of the global shape (each rank takes its part)."""
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: the state has {tuple(value.shape)}, the model's (global) shape is "
                f"{self.shape}; build the EMA on the same architecture"
            )
        if is_dtensor(value):
            if value.device_mesh != self.mesh:  # type: ignore[attr-defined]
                raise ValueError(
                    f"{key!r} is a DTensor on another device mesh than the model's; load a full tensor "
                    "(averaged_state_dict(full=True), polyak.save) or use torch.distributed.checkpoint, which "
                    "reshards"
                )
            if tuple(value.placements) != self.placements:  # type: ignore[attr-defined]
                value = value.redistribute(self.mesh, self.placements)  # type: ignore[attr-defined]
            return self.local(value)
        return self.take(value)


@dataclass
class Shards:
    """The sharded tensors of one EMA: placement, live DTensor and last seen local tensor per key."""

    placements: dict[str, Placement]
    live: dict[str, Tensor]
    locals: dict[str, Tensor] = field(default_factory=dict)
    stamps: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.locals = {key: self.placements[key].local(t) for key, t in self.live.items()}
        self.stamps = {key: self.placements[key].stamp(t) for key, t in self.live.items()}
        self._keys = list(self.live)

    def follow(self, rebound: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rebind the re-assigned tensors (``rebound``: key -> new live tensor) and find the local shards
        that were re-pointed (FSDP2's lazy initialisation and state-dict loads may do this); return every
        changed source, key -> the tensor the engine now reads (a local shard for a sharded key)."""
        out = dict(rebound)
        for key in rebound.keys() & self.live.keys():
            self.live[key] = rebound[key]
        now = [self.placements[k].stamp(self.live[k]) for k in self._keys]
        if rebound or any(map(is_not, now, (self.stamps[k] for k in self._keys))):
            for key, stamp in zip(self._keys, now):
                if stamp is not self.stamps[key] or key in rebound:
                    self.stamps[key] = stamp
                    self.locals[key] = out[key] = self.placements[key].local(self.live[key])
        return out

    def wrap(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``values`` (local tensors by key) with every sharded key wrapped as its placement's state value."""
        return {k: self.placements[k].wrap(v) if k in self.placements else v for k, v in values.items()}

    def localize(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """An EMA state (``polyak._state``) with each sharded average as this rank's local tensor; a
        malformed state is returned as it is, for ``_state.parse`` to name what is wrong."""
        averages = state.get("averages") if isinstance(state, Mapping) else None
        if not isinstance(averages, (list, tuple)) or not all(isinstance(a, Mapping) for a in averages):
            return state
        local = [
            {
                k: self.placements[normalize_key(k)].accept(k, v)
                if isinstance(k, str) and isinstance(v, Tensor) and normalize_key(k) in self.placements
                else v
                for k, v in average.items()
            }
            for average in averages
        ]
        return {**state, "averages": local}


def local_pairs(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """``(target, value)`` pairs of ``EMA.copy_to`` as local shards (DTensors have no foreach copy);
    a ValueError, before anything is written, where the target is not sharded like the value."""
    out = []
    for dst, value in pairs:
        if is_dtensor(dst) != is_dtensor(value) or (
            is_dtensor(dst)
            and (dst.device_mesh != value.device_mesh or tuple(dst.placements) != tuple(value.placements))  # type: ignore[attr-defined]
        ):
            raise ValueError(
                "copy_to: the averages are DTensor shards but the target model is not sharded the same way; shard "
                "the target like the model (same mesh and placements), or load ema.averaged_state_dict(full=True) "
                "into an unsharded model"
            )
        out.append((dst.to_local(), value.to_local()) if is_dtensor(dst) else (dst, value))  # type: ignore[attr-defined]
    return out


def shards_of(selected: list[Selected]) -> Shards | None:
    """The ``Shards`` of the averaged DTensors among ``selected``; None when there are none."""
    live = {s.key: s.tensor for s in selected if s.mode == "average" and is_dtensor(s.tensor)}
    if not live:
        return None
    if _torch_version() < (2, 7):
        raise ValueError(
            f"averaging DTensor parameters (FSDP2, tensor parallelism) needs torch >= 2.7 (it takes each rank's "
            f"part of a full tensor with distribute_tensor(src_data_rank=None)); this is torch {torch.__version__}. "
            "Upgrade torch, or wrap the model in DDP"
        )
    placements: dict[str, Placement] = {k: DTensorPlacement.of(t) for k, t in live.items()}
    return Shards(placements, live)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def replaced_message(key: str, old: Tensor, new: Tensor) -> str | None:
    """The specific error for an averaged parameter replaced by FSDP2, or None for the generic one."""
    if is_dtensor(old) and not is_dtensor(new):
        return (
            f"FSDP2 holds unsharded parameters: {key!r} is a plain tensor, not the DTensor shard the EMA averages. FSDP2 keeps "
            "the unsharded parameters in the module between forward and backward, and after a forward under "
            "torch.no_grad() (the root module's default reshard_after_forward). Call ema.update() after "
            "optimizer.step(), or call model.reshard() (FSDPModule.reshard(), on every FSDP module, no "
            "collective) before it"
        )
    if is_dtensor(new) and not is_dtensor(old):
        return (
            f"the model changed after the EMA was built: parameter {key!r} became a DTensor: the model was sharded (FSDP2's "
            "fully_shard, tensor parallelism) after the EMA was built. Build the EMA after sharding the model: "
            "each rank then averages its own shards"
        )
    return None


def reshard(model: nn.Module) -> None:
    """``FSDPModule.reshard()`` on every FSDP2 module of ``model`` (local: frees the unsharded parameters
    and registers the sharded ones again; no collective). Nothing when FSDP2 was never imported."""
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def agree(ok: bool | Tensor, device: torch.device) -> bool | Tensor:
    """Whether every rank's update is finite: ONE all-reduce (MIN) of ``ok`` over the default process
    group, so that ``nonfinite="skip"`` refuses an update on every rank or on none (the shards of one
    average would otherwise diverge). A host bool in, a host bool out; a device flag stays on the device."""
    import torch.distributed as dist

    flag = ok.to(device=device, dtype=torch.int32) if isinstance(ok, Tensor) else torch.tensor(int(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool() if isinstance(ok, Tensor) else bool(flag.item())


def full_items(state: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``state``'s items with every DTensor gathered, one at a time, to a full CPU tensor on rank 0.

    A collective: every rank must iterate to the end; rank 0 gets every item, the other ranks none. Rank 0
    holds at most one full tensor beyond its shards on the accelerator (the one being moved to the CPU)."""
    import torch.distributed as dist

    first = not dist.is_initialized() or dist.get_rank() == 0
    for key, value in state.items():
        if is_sharded(value):
            full = value.full_tensor()
            if first:
                yield key, full.cpu()
            del full
        elif first:
            yield key, value
