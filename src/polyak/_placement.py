"""Where an EMA's averages live across ranks: one interface, three kinds, chosen once at construction.

* ``Whole``: every process holds every average whole (a plain model, or DDP without ``shard=``);
  every method is the identity or does nothing.
* ``DTensorShards``: DTensor parameters (FSDP2, tensor parallelism, HSDP); each rank averages its local
  shards, state values are DTensors (``polyak._sharding``).
* ``RankSplit``: ``EMA(shard=...)`` over DDP's replicated parameters; each rank keeps ``1/world`` of each
  shadow group (``polyak._rank_shard``), full values come back by all-gathers.

The facade calls the same methods whatever the kind, so ``update()`` and the readers of the average
have no ``if sharded`` branch. The per-key placements (``polyak._sharding.Placement``) stay in
``Shards``; this module only decides what the whole EMA does with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _kernels, _rank_shard, _sharding
from polyak._layout import Group
from polyak._select import Selected, copy_pairs

__all__ = ["DTensorShards", "RankSplit", "Whole", "storage_of"]

NO_REPLICAS: Mapping[str, Tensor] = {}


class Whole:
    """Every average whole on this process: the identity placement, and the interface the sharded kinds
    override (the facade types its placement as ``Whole``)."""

    shards: _sharding.Shards | None = None
    layouts: Sequence[_rank_shard.RankLayout] = ()
    replicas: Mapping[str, Tensor] = NO_REPLICAS  # whole live tensors written by an all-gather (RankSplit)
    probe_all = False  # the watch compares every parameter slot (FSDP2 swaps any of them)
    module_refusal: str | None = None  # why ema.module() cannot be built, if it cannot
    describe = ""  # for repr

    @property
    def locals(self) -> Mapping[str, Tensor] | None:
        """Key -> the local part the engine reads in place of the live tensor (None: the live tensors)."""
        return None if self.shards is None else self.shards.locals

    def follow(self, rebound: dict[str, Tensor]) -> dict[str, Tensor]:
        """The changed sources (key -> the tensor the engine now reads) after the watch's ``rebound``."""
        return rebound

    def reshard(self, model: nn.Module) -> None:
        """Free FSDP2's unsharded parameters before the shards are read or written (local)."""

    def agrees(self, nonfinite: str) -> bool:
        """Whether the ranks agree on each update's finiteness verdict (one all-reduce per update)."""
        return False

    def state_values(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Local averages by key as state values (DTensors, flat ranges; no collective)."""
        return values

    def full(self, state: dict[str, Any]) -> dict[str, Any]:
        """``averaged_state_dict(full=True)``: every sharded value gathered (a collective)."""
        return state

    def localize(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """A state to load, with every average as this rank's local tensor."""
        return state

    def gather_into(self, averaged: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        """Write the averages of the ``replicas`` keys into whole ``targets`` (one all-gather per group)."""

    def copy_pairs(
        self, selected: list[Selected], targets: list[Selected], averaged: dict[str, Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """``(target, value)`` pairs of ``EMA.copy_to``, checked before anything is written."""
        return copy_pairs(selected, targets, averaged)

    def swapped(self, groups: Sequence[Group], selected: Sequence[Selected]) -> list[Tensor]:
        """The live tensors ``EMA.apply()`` backs up before ``write_``: every averaged source (split over
        the ranks, the whole live parameters: the all-gather writes every element) and every buffer that
        is not averaged (code inside the block, a train-mode forward or ``update_bn``, may change them)."""
        replicas = self.replicas
        live = list(replicas.values()) + [s for g in groups for k, s in zip(g.keys, g.sources) if k not in replicas]
        return live + [s.tensor for s in selected if s.is_buffer and s.mode != "average"]

    def write_(self, groups: Sequence[Group], averaged: Sequence[list[Tensor]]) -> None:
        """Write each group's averaged values (model order) into the live tensors: what this rank holds
        whole locally, then (split over the ranks) the ``replicas`` by one all-gather per shadow group."""
        replicas = self.replicas
        for group, values in zip(groups, averaged):
            whole = [i for i, k in enumerate(group.keys) if k not in replicas]
            _kernels.copy_([group.sources[i] for i in whole], [values[i] for i in whole])
        if replicas:
            self.gather_into({k: v for g, vs in zip(groups, averaged) for k, v in zip(g.keys, vs)}, replicas)


class DTensorShards(Whole):
    """DTensor parameters: each rank averages its local shards; state values are DTensors."""

    probe_all = True
    module_refusal = "DTensor shards (FSDP2, tensor parallelism)"

    shards: _sharding.Shards

    def __init__(self, shards: _sharding.Shards) -> None:
        self.shards = shards

    def follow(self, rebound: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.shards.follow(rebound)

    def reshard(self, model: nn.Module) -> None:
        _sharding.reshard(model)

    def agrees(self, nonfinite: str) -> bool:
        return nonfinite == "skip"

    def state_values(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.shards.wrap(values)

    def full(self, state: dict[str, Any]) -> dict[str, Any]:
        return dict(_sharding.full_items(state))

    def localize(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.shards.localize(state)

    def copy_pairs(
        self, selected: list[Selected], targets: list[Selected], averaged: dict[str, Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        return _sharding.local_pairs(copy_pairs(selected, targets, self.state_values(averaged)))


class RankSplit(DTensorShards):
    """``EMA(shard=...)``: each rank keeps ``1/world`` of each shadow group of DDP's replicated weights."""

    probe_all = False  # DDP's replicas stay put: the usual probes suffice
    module_refusal = "1/world of each parameter per rank (shard=...)"

    def __init__(self, shards: _sharding.Shards, layouts: list[_rank_shard.RankLayout]) -> None:
        super().__init__(shards)
        self.layouts = layouts
        self.replicas = shards.live
        self.describe = f", shard over {layouts[0].world} ranks"

    def agrees(self, nonfinite: str) -> bool:
        return False  # every rank checks every (replicated) weight: the same verdict, no collective

    def gather_into(self, averaged: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        for layout in self.layouts:
            layout.gather_(averaged, targets)

    def copy_pairs(
        self, selected: list[Selected], targets: list[Selected], averaged: dict[str, Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        replicas = self.replicas
        whole = {k: v.new_empty(replicas[k].shape) if k in replicas else v for k, v in averaged.items()}
        self.gather_into(averaged, whole)  # one all-gather per group, before the checks
        return copy_pairs(selected, targets, whole)


def storage_of(
    selected: list[Selected],
    *,
    shard: Any,
    dtype: torch.dtype | None,
    device: torch.device | None,
    flatten: bool,
    capturable: bool,
) -> Whole:
    """The placement of an EMA over ``selected``: DTensor shards if any averaged tensor is a DTensor, a
    rank split for ``shard`` not False, else whole; a ValueError for combinations that cannot work."""
    shards = _sharding.shards_of(selected)
    if shard is not False:
        if shards is not None:
            raise ValueError(
                "EMA(shard=...) splits replicated (DDP) parameters over the ranks, but this model's parameters are "
                "DTensors (FSDP2's fully_shard, tensor parallelism), already sharded: each rank averages its own "
                "shards. Leave shard=False"
            )
        for name, value in (("flatten", flatten), ("capturable", capturable)):
            if value:
                raise ValueError(
                    f"EMA(shard=...) cannot be combined with {name}=True: each rank averages 1-D slices of the live "
                    f"weights, which {name}=True does not support. Use one of the two"
                )
        layouts = _rank_shard.layouts_of(selected, dtype=dtype, device=device, shard=shard)
        placements: dict[str, _sharding.Placement] = {}
        for layout in layouts:
            placements.update(layout.slices())
        split = _sharding.Shards(placements, {s.key: s.tensor for s in selected if s.key in placements})
        # no averaged parameter (only buffers): an empty split, which acts as empty DTensor shards
        return RankSplit(split, layouts) if layouts else DTensorShards(split)
    if shards is not None and flatten:
        raise ValueError(
            "EMA(flatten=True) re-points the model's parameters into one buffer, but this model's parameters "
            "are DTensors (FSDP2's fully_shard, tensor parallelism) whose storage FSDP owns; leave "
            "flatten=False (each rank then averages its local shards)"
        )
    return Whole() if shards is None else DTensorShards(shards)
