"""Building an EMA: the arguments checked once into a frozen ``Config``, then the engine it runs.

``configure`` validates every argument of ``EMA(...)`` (of the model, only its type) and returns a
``Config`` (the settings the facade stores, also the ``config`` of a saved state). ``build`` does the
rest, in this order, before any shadow is written: reshard FSDP2 modules (local), select the tensors,
choose the placement (``polyak._placement``), watch the model, allocate the shadow groups, initialise
them (copy, or zero for ``debias``), plan each group's reader and, with ``flatten=True``, re-point the
parameters into one buffer per group. ``ledger`` then puts the counters where the finiteness flag is
computed (the facade asks ``flag_on_cuda`` through ``EMA._check_on_device``, which tests override).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from polyak import _kernels, _sharding
from polyak._counters import Counters, DeviceCounters, Ledger
from polyak._decide import check_tensor_forms, checked_decay, tensor_schedules
from polyak._engine import plan
from polyak._layout import Group, build_groups, check_one_device
from polyak._placement import Whole, storage_of
from polyak._readers import flatten_sources
from polyak._select import BufferPolicy, Pattern, Selected, select
from polyak._validate import as_bool, as_int
from polyak._watch import ModelWatch
from polyak.schedules import TensorSchedule, as_schedule

__all__ = [
    "NONFINITE_POLICIES",
    "Config",
    "Engine",
    "NonFinitePolicy",
    "build",
    "configure",
    "flag_on_cuda",
    "ledger",
    "replan",
]

log = logging.getLogger("polyak")

NonFinitePolicy = Literal["raise", "skip", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip", "ignore")


@dataclass(frozen=True)
class Config:
    """The settings of one EMA, validated (``configure``)."""

    schedules: tuple[Callable[[int], float], ...]
    tensor_schedules: tuple[TensorSchedule, ...]  # the tensor forms (capturable only)
    start_step: int
    update_every: int
    buffers: BufferPolicy
    dtype: torch.dtype | None
    device: torch.device | None
    debias: bool
    nonfinite: NonFinitePolicy
    flatten: bool
    capturable: bool

    @property
    def num_averages(self) -> int:
        return len(self.schedules)


def configure(
    model: Any,
    decay: Any,
    *,
    start_step: Any,
    update_every: Any,
    buffers: BufferPolicy,
    dtype: Any,
    device: Any,
    debias: Any,
    nonfinite: Any,
    flatten: Any,
    capturable: Any,
) -> Config:
    """Every argument of ``EMA(...)`` checked (a TypeError/ValueError naming it), the model's type only."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"EMA expects a torch.nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "EMA was built inside torch.inference_mode(): its averages would be inference tensors, which "
            "no later update() may change. Build the EMA outside the inference_mode() block (e.g. before "
            "the training loop); use torch.no_grad() if you need to disable autograd"
        )
    decays: Sequence[Any] = decay if isinstance(decay, (list, tuple)) else [decay]
    if not decays:
        raise ValueError("decay is an empty sequence; pass a float, a schedule, or a non-empty list")
    schedules = tuple(as_schedule(d) for d in decays)
    for i, schedule in enumerate(schedules):
        checked_decay(schedule, 1, i)  # fail at construction, not at the first update
    start_step = as_int(start_step, "start_step", minimum=0)
    update_every = as_int(update_every, "update_every", minimum=1)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    debias = as_bool(debias, "debias")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    flatten = as_bool(flatten, "flatten")
    capturable = as_bool(capturable, "capturable")
    return Config(
        schedules=schedules,
        tensor_schedules=tensor_schedules(schedules, update_every) if capturable else (),
        start_step=start_step,
        update_every=update_every,
        buffers=buffers,
        dtype=dtype,
        device=torch.device(device) if device is not None else None,
        debias=debias,
        nonfinite=cast(NonFinitePolicy, nonfinite),
        flatten=flatten,
        capturable=capturable,
    )


@dataclass(frozen=True)
class Engine:
    """What ``build`` made: the selection, the placement, the watch and the shadow groups."""

    selected: list[Selected]
    storage: Whole
    watch: ModelWatch
    groups: list[Group]


def replan(groups: Sequence[Group], config: Config) -> None:
    """Choose each group's reader again (``polyak._engine.plan``) after its sources changed."""
    for group in groups:
        plan(group, num_averages=config.num_averages, nonfinite=config.nonfinite, capturable=config.capturable)


def flag_on_cuda(groups: Sequence[Group]) -> bool:
    """True when the finiteness flag of an update is computed on a CUDA device (the host must not read it
    during ``update()``)."""
    return any(g.device.type == "cuda" or (g.plan != "offload" and g.sources[0].device.type == "cuda") for g in groups)


def ledger(groups: Sequence[Group], config: Config, *, on_cuda: bool) -> Ledger:
    """Fresh counters, where they live: on the device that computes the finiteness flag (a CUDA group if
    any) with ``capturable``, or under the check when the flag is computed on CUDA (``on_cuda``,
    ``flag_on_cuda``); else on the host."""
    fresh = Counters.fresh(config.num_averages)
    if not (config.capturable or (config.nonfinite != "ignore" and on_cuda)):
        return Ledger(fresh, None, config.capturable)
    places = [g.device for g in groups if g.device.type == "cuda"] + [g.device for g in groups]
    place = places[0] if places else torch.device("cpu")
    return Ledger(fresh, DeviceCounters.create(place, config.num_averages), config.capturable)


def build(
    model: nn.Module,
    config: Config,
    *,
    include: Pattern | Iterable[Pattern] | None,
    exclude: Pattern | Iterable[Pattern] | None,
    shard: Any,
) -> Engine:
    """The engine of an EMA over ``model`` (see the module docstring for the order of the steps)."""
    _sharding.reshard(model)  # FSDP2 modules (local, no collective): average the shards, not gathered copies
    selected = select(model, include=include, exclude=exclude, buffers=config.buffers)
    storage = storage_of(
        selected,
        shard=shard,
        dtype=config.dtype,
        device=config.device,
        flatten=config.flatten,
        capturable=config.capturable,
    )
    watch = ModelWatch(model, selected, probe_all=storage.probe_all)
    groups = build_groups(
        selected, num_averages=config.num_averages, dtype=config.dtype, device=config.device, local=storage.locals
    )
    if config.capturable:
        check_one_device(groups, config.device)
        device = groups[0].device if groups else (config.device or torch.device("cpu"))
        check_tensor_forms(config.tensor_schedules, device)
    with torch.no_grad():
        for group in groups:
            if config.debias:
                group.flat.zero_()
            else:
                for views in group.views:
                    _kernels.copy_(views, group.sources)
    replan(groups, config)
    for group in groups if config.flatten else ():
        reader = flatten_sources(group.sources, group.dtype, group.device, group.order)
        if reader is None:
            log.info(
                "polyak: EMA(flatten=True) left %d tensor(s) of shadow group (%s, %s) as they are: "
                "they differ in dtype/device or are not contiguous",
                len(group.sources),
                group.device,
                group.dtype,
            )
        else:
            group.reader = reader
    return Engine(selected, storage, watch, groups)
