"""``EMA``: an exponential (or uniform) moving average of a model's weights, matched by name.

A facade: it validates once, holds typed state and calls one engine for every mode (see
``docs/architecture.md``): ``_watch`` (has the model changed?), ``_decide`` (what this call does),
``_readers`` (the live weights of each shadow group), ``_kernels`` (the finiteness check and the one
weighted-lerp family), ``_counters`` (the bookkeeping, on the host or on the device). The model is never
deep-copied: shadows are flat buffers keyed by the model's normalised parameter names (``_layout``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polyak import _kernels, _rank_shard, _sharding, _state
from polyak._counters import Counters, DeviceCounters, advance, refusal_message
from polyak._decide import (
    Decision,
    TensorDecision,
    check_tensor_forms,
    checked_decay,
    decay_product,
    decide,
    decide_tensor,
    tensor_schedules,
)
from polyak._layout import Group, build_groups, check_one_device
from polyak._module import averaged_module
from polyak._readers import flatten_sources, plan_reader
from polyak._select import BufferPolicy, Pattern, Selected, copy_pairs, select
from polyak._validate import as_bool, as_int
from polyak._watch import ModelWatch
from polyak.schedules import DEFAULT_DECAY, as_schedule

__all__ = ["EMA", "NonFinitePolicy"]

log = logging.getLogger("polyak")

NonFinitePolicy = Literal["raise", "skip", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip", "ignore")
STATE_FORMAT = _state.STATE_FORMAT
STATE_VERSION = _state.STATE_VERSION

DecayLike = float | Callable[[int], float]


class EMA:
    """A moving average of a model's parameters (and float buffers), held as named shadow tensors.

    Update rule, at the t-th averaging update (t counts calls after ``start_step``)::

        shadow <- beta_t * shadow + (1 - beta_t) * weight          (computed as shadow.lerp_(weight, 1 - beta_t))

    Args:
        model: the live model (plain, DDP/DataParallel-wrapped or ``torch.compile``d); never copied. With
            DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, HSDP; build the EMA after
            sharding; building it reshards FSDP2 modules, locally) each rank keeps shadows of its own
            local shards only, and ``update()`` issues no collective (see ``docs/distributed.md`` for which
            calls are collectives).
        decay: a float in [0, 1] (constant decay; 1 freezes the average), a schedule ``t -> beta_t`` from
            ``polyak.schedules``, or a sequence of those to keep several averages (``index=`` selects one).
            Default: ``schedules.DEFAULT_DECAY``, the power-function EMA ``(1 - 1/t) ** 17.97`` (EDM2, sigma_rel 0.05).
        start_step: for the first ``start_step`` calls of ``update()`` the shadow copies the weights.
        update_every: average on every k-th call only, with the decays of the k steps multiplied
            (``beta**k`` for a constant beta), so the result does not depend on k when the weights are
            constant between updates; long products use the schedule's closed form.
        include, exclude: names, glob patterns (``"*.bias"``), module prefixes (``"backbone"``) or compiled
            regexes. Parameters left out are not shadowed: the averaged model uses their live values.
        buffers: ``"average"`` float buffers (e.g. BatchNorm statistics), ``"copy"`` their live values
            into the averaged model, or ``"skip"`` them (left out of ``averaged_state_dict``, untouched by
            ``copy_to``). Integer buffers are always copied exactly, never averaged.
        dtype: shadow dtype. Default: float32 for float16/bfloat16 weights, else the weight's dtype.
        device: shadow device, e.g. ``"cpu"`` to offload; default: each weight's own device. With a CUDA
            model and ``device="cpu"`` the weights are copied into pinned host memory on a side stream
            (one wait per update for that copy, none on the training stream) and averaged on the CPU.
        debias: zero-initialised shadow with bias correction ``shadow / (1 - prod(beta))`` (Adam-style);
            the average is exact from the first update, whatever the decay.
        nonfinite: what an update does when a weight holds NaN or inf: ``"raise"`` a ValueError naming
            the tensors (default), ``"skip"`` that update (counted in ``skipped_updates``, logged), or
            ``"ignore"`` (no check; fastest; the NaN enters the average). A refused update leaves every
            average and the debias products bit-for-bit unchanged. On CPU the check (one sum per tensor,
            re-checked exactly with ``aminmax`` if a sum overflows) runs before anything is written. On
            CUDA the update never waits for the device: the flag masks the update on the device, the
            counters live there, and the error or the skip count happen at the next point where the host
            looks: the next ``update()`` whose copy of the count has landed, or ``apply``/``copy_to``/
            ``averaged_state_dict``/``state_dict``/``synchronize()``, which wait for it. With sharded
            (DTensor) parameters ``"skip"`` makes every update one collective: an all-reduce of the
            finiteness flag over the default process group, so that every rank skips the same updates
            (a NaN seen by one rank would otherwise leave the shards of an average from different
            steps); ``"raise"`` (only the rank that sees the NaN raises) and ``"ignore"`` communicate
            nothing.
        flatten: opt-in speed-up for models with many small tensors: make the model's averaged tensors
            views into one contiguous buffer per (device, dtype), laid out like the shadows, so an update
            is one flat ``lerp_`` per average with no gather (as FSDP/DeepSpeed flat parameters do).
            Parameters keep their identity (``p.data`` is re-pointed), so an optimizer built before or
            after keeps working; build the EMA before ``torch.compile``, DDP/FSDP wrapping, or anything
            that records parameter addresses (CUDA graphs). If a parameter is later re-assigned
            (``model.half()``, ``p.data = ...``) the next update notices (one read of the buffer's storage
            use count per update), logs a warning and falls back to the default path. Refused (ValueError)
            for DTensor parameters, whose storage FSDP owns.
        capturable: opt-in (named after ``torch.optim``'s ``capturable=True``): the counters live as
            tensors on the shadow device and ``update()`` runs the same tensor ops on every call, with no
            host read and no Python branch on the step, so a CUDA graph can capture it and
            ``torch.compile(fullgraph=True)`` traces it once. Each decay comes from the schedule's tensor
            form (``at_tensor``; a plain callable raises a TypeError); a copy is lerp weight 1 and an
            off-step weight 0. The shadows equal the default path's bit for bit on CPU (tested), except
            that ``ultralytics`` uses ``torch.exp`` (may differ from ``math.exp`` in the last bit), a -0.0
            may become +0.0, and under ``nonfinite="ignore"`` an inf weight on a copy or off-step becomes
            NaN. Refusals are reported in ``synchronize()``, ``apply``, ``copy_to``,
            ``averaged_state_dict`` and ``state_dict``; reading ``step``/``last_decays`` waits for the
            device. Costs 35 to 100 tiny ops per update (free inside a CUDA graph, launch-bound eagerly).
            Not supported: shadows on another device than the weights (``device="cpu"``: ValueError).
            After capturing, do not re-assign parameters: a captured graph keeps reading the old memory.
        shard: for replicated parameters (DDP): ``True`` splits every average over the ranks of the default
            process group, a ``torch.distributed.ProcessGroup`` over that group's ranks. Each rank keeps
            ``ceil(N / world)`` columns of each ``(K, N)`` shadow group (``torch.chunk``'s layout: the
            memory of the averages shrinks by the world size) and ``update()`` lerps them from its own copy
            of the weights: no collective, and the bits of the replicated average. The NaN/inf check
            reads every weight on every rank (they are the same), so all ranks reach the same verdict with
            no collective. Full values come back with collectives every rank must make: ``apply()`` (one
            all-gather per shadow group into the live weights), ``copy_to``, ``averaged_state_dict(
            full=True)`` and ``polyak.save`` (one gather per tensor, written by rank 0). ``state_dict()``
            holds each rank's flat ranges for ``torch.distributed.checkpoint``, which reshards them
            between world sizes. Needs an initialised process group; not with ``flatten=True``,
            ``capturable=True`` or DTensor parameters (FSDP2 shards those already: leave ``shard=False``).
            See ``docs/distributed.md``.

    How one update runs (readers, kernels, counters) is described in ``docs/architecture.md``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: DecayLike | Sequence[DecayLike] = DEFAULT_DECAY,
        *,
        start_step: int = 0,
        update_every: int = 1,
        include: Pattern | Iterable[Pattern] | None = None,
        exclude: Pattern | Iterable[Pattern] | None = None,
        buffers: BufferPolicy = "average",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        debias: bool = False,
        nonfinite: NonFinitePolicy = "raise",
        flatten: bool = False,
        capturable: bool = False,
        shard: bool | Any = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA expects a torch.nn.Module, got {type(model).__name__}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "EMA was built inside torch.inference_mode(): its averages would be inference tensors, which "
                "no later update() may change. Build the EMA outside the inference_mode() block (e.g. before "
                "the training loop); use torch.no_grad() if you need to disable autograd"
            )
        decays: Sequence[DecayLike] = decay if isinstance(decay, (list, tuple)) else [decay]  # type: ignore[list-item]
        if not decays:
            raise ValueError("decay is an empty sequence; pass a float, a schedule, or a non-empty list")
        self.schedules: tuple[Callable[[int], float], ...] = tuple(as_schedule(d) for d in decays)
        for i, schedule in enumerate(self.schedules):
            checked_decay(schedule, 1, i)  # fail at construction, not at the first update
        self.start_step = as_int(start_step, "start_step", minimum=0)
        self.update_every = as_int(update_every, "update_every", minimum=1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
        self.debias = as_bool(debias, "debias")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.flatten = as_bool(flatten, "flatten")
        self.capturable = as_bool(capturable, "capturable")
        self._tensor_schedules = tensor_schedules(self.schedules, self.update_every) if capturable else ()

        self.model = model
        self.buffers: BufferPolicy = buffers
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite: NonFinitePolicy = nonfinite
        self._include = include
        self._exclude = exclude
        self.skipped_updates = 0  # updates refused by nonfinite="skip" (and reported)
        self._applied = False
        self._hooks: list[Any] = []
        _sharding.reshard(model)  # FSDP2 modules (local, no collective): average the shards, not gathered copies
        self._selected: list[Selected] = select(model, include=include, exclude=exclude, buffers=buffers)
        # DTensor parameters (FSDP2, tensor parallel, HSDP): every rank averages its local shards
        self._shards = _sharding.shards_of(self._selected)
        # replicated parameters split over the ranks (EMA(shard=...)): the same seam, one RankSlice per key
        self._rank_layouts: list[_rank_shard.RankLayout] = []
        if shard is not False:
            self._rank_layouts = self._split_over_ranks(shard)
        if self._shards is not None and self.flatten:
            raise ValueError(
                "EMA(flatten=True) re-points the model's parameters into one buffer, but this model's parameters "
                "are DTensors (FSDP2's fully_shard, tensor parallelism) whose storage FSDP owns; leave "
                "flatten=False (each rank then averages its local shards)"
            )
        # FSDP2 swaps parameter slots; DDP's replicas (shard=...) stay put, so the usual probes suffice
        self._watch = ModelWatch(model, self._selected, probe_all=self._shards is not None and not self._rank_layouts)
        self._groups: list[Group] = build_groups(
            self._selected,
            num_averages=len(self.schedules),
            dtype=dtype,
            device=self.device,
            local=None if self._shards is None else self._shards.locals,
        )
        # The bookkeeping: host numbers; with counters on the device (capturable, or a CUDA model with the
        # NaN check) the device holds the truth and the host copy is refreshed by _poll.
        self._counters = Counters.fresh(self.num_averages)
        self._device: DeviceCounters | None = None
        if capturable:
            check_one_device(self._groups, self.device)
            device = self._groups[0].device if self._groups else (self.device or torch.device("cpu"))
            check_tensor_forms(self._tensor_schedules, device)
        with torch.no_grad():
            for group in self._groups:
                if debias:
                    group.flat.zero_()
                else:
                    for views in group.views:
                        _kernels.copy_(views, group.sources)
        for group in self._groups:
            self._plan(group)
        if capturable or (self.nonfinite != "ignore" and self._check_on_device()):
            # on the device that computes the flag (a CUDA group if any): the host never reads it there
            places = [g.device for g in self._groups if g.device.type == "cuda"] + [g.device for g in self._groups]
            self._device = DeviceCounters.create(places[0] if places else torch.device("cpu"), self.num_averages)
        for group in self._groups if flatten else ():
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

    def _split_over_ranks(self, shard: Any) -> list[_rank_shard.RankLayout]:
        """``EMA(shard=...)``: check the combination, lay every shadow group out over the ranks and record
        each averaged tensor's ``RankSlice`` as its placement (no collective)."""
        if self._shards is not None:
            raise ValueError(
                "EMA(shard=...) splits replicated (DDP) parameters over the ranks, but this model's parameters are "
                "DTensors (FSDP2's fully_shard, tensor parallelism), already sharded: each rank averages its own "
                "shards. Leave shard=False"
            )
        for name, value in (("flatten", self.flatten), ("capturable", self.capturable)):
            if value:
                raise ValueError(
                    f"EMA(shard=...) cannot be combined with {name}=True: each rank averages 1-D slices of the live "
                    f"weights, which {name}=True does not support. Use one of the two"
                )
        layouts = _rank_shard.layouts_of(self._selected, dtype=self.dtype, device=self.device, shard=shard)
        placements: dict[str, _sharding.Placement] = {}
        for layout in layouts:
            placements.update(layout.slices())
        live = {s.key: s.tensor for s in self._selected if s.key in placements}
        self._shards = _sharding.Shards(placements, live)
        return layouts

    def _plan(self, group: Group) -> None:
        # With the check on the device (CUDA, or capturable) the update is masked on the device, which
        # needs a flat source.
        masked = (group.device.type == "cuda" or self.capturable) and self.nonfinite != "ignore"
        check = self.nonfinite != "ignore"
        group.reader = plan_reader(
            group.sources,
            group.dtype,
            group.device,
            num_averages=self.num_averages,
            check=check,
            force_gather=masked,
            order=group.order,
        )

    def _check_on_device(self) -> bool:
        """True when the finiteness flag lives on a CUDA device (read it later, never in update())."""
        return any(
            g.device.type == "cuda" or (g.plan != "offload" and g.sources[0].device.type == "cuda")
            for g in self._groups
        )

    @property
    def update_plans(self) -> list[tuple[str, str, str, int]]:
        """How each shadow group is read: ``(device, dtype, plan, number of tensors)``, where plan is
        ``"foreach"``, ``"gather"``, ``"flat"`` or ``"offload"`` (see ``polyak._readers``)."""
        return [(str(g.device), str(g.dtype), g.plan, len(g.sources)) for g in self._groups]

    # --- the counters ----------------------------------------------------------------------------------
    def _host_counters(self) -> Counters:
        """The counters on the host (a sync when they live on the device; refusals not acted on)."""
        if self._device is None:
            return self._counters
        read = self._device.read()
        if not self.capturable:  # the host counts the calls itself
            read = replace(read, step=self._counters.step)
        return read

    def _set_counters(self, **values: Any) -> None:
        """Overwrite counters (a load): on the host, and in place on the device."""
        self._counters = replace(self._host_counters(), refused=0, last_refused=0, **values)
        if self._device is not None:
            c = self._counters
            self._device.load(c.step, c.products, c.last_decays)

    @property
    def _step(self) -> int:
        return int(self._host_counters().step)

    @_step.setter
    def _step(self, value: int) -> None:
        self._set_counters(step=value)

    @property
    def _products(self) -> list[float]:
        """prod(beta) over every accepted averaging update, per average (a copy counts as beta = 0)."""
        return list(self._host_counters().products)

    @_products.setter
    def _products(self, value: Sequence[float]) -> None:
        self._set_counters(products=tuple(float(p) for p in value))

    @property
    def _last_decays(self) -> tuple[float, ...]:
        return tuple(self._host_counters().last_decays)

    @_last_decays.setter
    def _last_decays(self, value: Sequence[float]) -> None:
        self._set_counters(last_decays=tuple(float(d) for d in value))

    # --- public properties -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Calls of ``update()`` so far. With ``capturable=True`` the counter lives on the device and
        reading it waits for the device (a sync)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = as_int(value, "step", minimum=0)

    @property
    def last_decays(self) -> tuple[float, ...]:
        """The decay of each average at the last averaging update (0.0 after a copy). When the counters
        live on the device (``capturable=True``, a checked CUDA model) reading it waits for the device."""
        return self._last_decays

    @property
    def num_averages(self) -> int:
        """How many averages are kept (one per decay)."""
        return len(self.schedules)

    @property
    def averaged_keys(self) -> list[str]:
        """Normalised keys of the tensors that have a shadow."""
        return [key for group in self._groups for key in group.keys]

    def __repr__(self) -> str:
        numel = sum(g.numel for g in self._groups)
        decays = ", ".join(repr(s) for s in self.schedules)
        return (
            f"EMA(decay=[{decays}], step={self.step}, averaged={len(self.averaged_keys)} tensors "
            f"({numel:,} elements), start_step={self.start_step}, update_every={self.update_every}, "
            f"buffers={self.buffers!r}, debias={self.debias}{', capturable=True' if self.capturable else ''}"
            f"{f', shard over {self._rank_layouts[0].world} ranks' if self._rank_layouts else ''})"
        )

    def decays_at(self, t: int) -> tuple[float, ...]:
        """The decay of each average at averaging step ``t`` (product over the ``update_every`` steps)."""
        lo = max(1, t - self.update_every + 1)
        return tuple(decay_product(s, lo, t, i) for i, s in enumerate(self.schedules))

    # --- the update ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average. Call after ``optimizer.step()``.

        One path for every mode: follow the model, decide, read, check, lerp, advance the counters.
        Never reads a value back from a CUDA device (see ``nonfinite`` for when a NaN is reported).
        """
        if self._applied:
            raise RuntimeError(
                "ema.update() was called inside `with ema.apply():`; the live model holds the averaged "
                "weights there. Update outside the block."
            )
        compiling = torch.compiler.is_compiling()
        if not self.capturable:
            self._poll(block=False)
        if not compiling:  # host-side checks only (no device read); dynamo guards itself
            self._check_model_unchanged()
        decision: Decision | TensorDecision
        if self._device is not None and self.capturable:
            step = self._device.step + 1
            decision = decide_tensor(self._tensor_schedules, step, self.start_step, self.update_every)
            weights: Sequence[float] | Tensor = decision.weights
        else:
            decision = decide(self.schedules, self._counters.step + 1, self.start_step, self.update_every)
            weights = decision.weights
            if not decision.active:
                self._advance(decision, True)
                return
        try:
            sources = self._read(compiling)
            ok = self._finite(sources)
            if isinstance(ok, list):  # refused on the host (the tensors named): no shadow is written
                self._refuse(ok, self._counters.step + 1)  # "raise" raises here: the call is not counted
                self._advance(decision, False)
                return
            for group, src in zip(self._groups, sources):
                gok = ok.to(group.flat.device) if isinstance(ok, Tensor) else None
                gweights = weights
                if isinstance(weights, Tensor):
                    gweights = weights.to(device=group.device, dtype=_kernels.lerp_weight_dtype(group.dtype))
                _kernels.lerp_shadows_(
                    group.views, group.flat, group.sources, src, gweights, gok, same_dtype=group.reader.same_dtype
                )
        except RuntimeError:
            self._watch.verify(strict_identity=False)  # raises a clear error if the model changed
            raise
        self._advance(decision, ok)

    def _advance(self, decision: Decision | TensorDecision, ok: bool | Tensor) -> None:
        """Move the counters (``polyak._counters.advance``) where they live; act on a host refusal."""
        if self._device is not None:
            self._device.advance_(decision, ok)
            if not self.capturable:
                self._counters = replace(self._counters, step=self._counters.step + 1)
                if isinstance(ok, Tensor):
                    self._device.start_refusal_copy()
            return
        self._counters = advance(self._counters, decision, ok)

    def _read(self, compiling: bool) -> list[Tensor | None]:
        """Every group's flat source (``_source``). Nothing is written before this returns, so a reader
        that fails (a tensor moved to another device or shape since it was built) is replaced and read
        once more, after the model walk has raised a clear error for a changed shape."""
        try:
            return [self._source(group, compiling) for group in self._groups]
        except RuntimeError:
            rebound = self._watch.verify(strict_identity=False)
            if self._shards is not None:
                rebound = self._shards.follow(rebound)
            for group in self._groups:
                group.sources = [rebound.get(k, src) for k, src in zip(group.keys, group.sources)]
                self._plan(group)
            return [self._source(group, compiling) for group in self._groups]

    def _source(self, group: Group, compiling: bool) -> Tensor | None:
        """The group's flat source (None: per-tensor). Under ``torch.compile`` (capturable), for real
        floating sources on the shadow's device: a plain ``cat`` of the live tensors, which inductor fuses
        into the lerp (no scratch copy, and no cached view left stale by a re-assigned parameter)."""
        if compiling and all(s.is_floating_point() and s.device == group.device for s in group.sources):
            return torch.cat([group.sources[i].detach().reshape(-1).to(group.dtype) for i in group.order])
        return group.reader.read()

    def _finite(self, sources: list[Tensor | None]) -> bool | Tensor | list[str]:
        """The finiteness verdict of this update: True (fine, or no check), a 0-dim device flag that the
        host never reads here, or the keys of the non-finite tensors (checked on the host)."""
        if self.nonfinite == "ignore" or not self._groups:
            return True
        replicas = self._replicas()
        if replicas is not None:  # replicated weights: every rank checks all of them, the same verdict
            live = [[replicas.get(k, src) for k, src in zip(g.keys, g.sources)] for g in self._groups]
            if self._device is not None:
                return torch.stack([_kernels.all_finite(t).to(self._device.step.device) for t in live]).all()
            fine = [_kernels.finite_on_host(t) for t in live]
            if all(fine):
                return True
            return [
                g.keys[i] for g, t, f in zip(self._groups, live, fine) if not f for i in _kernels.nonfinite_indices(t)
            ]
        if self._device is not None:
            flags = [
                _kernels.all_finite(g.sources) if src is None else _kernels.flat_finite(src)
                for g, src in zip(self._groups, sources)
            ]
            device = self._device.step.device
            flag = torch.stack([f.to(device, non_blocking=True) for f in flags]).all()
            return _sharding.agree(flag, device) if self._agrees else flag
        fine = [_kernels.finite_on_host(g.sources if src is None else [src]) for g, src in zip(self._groups, sources)]
        ok = all(fine)
        if self._agrees:  # every rank makes the one all-reduce
            ok = bool(_sharding.agree(ok, torch.device("cpu")))
        if ok:
            return True
        bad = [g.keys[i] for g, f in zip(self._groups, fine) if not f for i in _kernels.nonfinite_indices(g.sources)]
        return bad or ["(a shard on another rank)"]

    @property
    def _agrees(self) -> bool:
        """Sharded and ``nonfinite="skip"``: the ranks agree on each update's verdict (one all-reduce),
        so the shards of an average are refused together."""
        return self._shards is not None and self.nonfinite == "skip" and not self._rank_layouts

    def _refuse(self, bad: list[str] | None, step: int, count: int = 1) -> bool:
        """Apply the policy to ``count`` refused updates (the last at ``step``; ``bad`` names the tensors,
        None when checked on the device): count and log them ("skip"), or raise ("raise")."""
        at, where = refusal_message(bad, step, count)
        if self.nonfinite == "skip":
            self.skipped_updates += count
            log.warning("polyak: skipped EMA update at %s: NaN/inf %s", at, where)
            return False
        raise ValueError(
            f"non-finite values (NaN or inf) {where} at {at}; the average was left unchanged. Fix the "
            "divergence (lower the learning rate, clip gradients) or build the EMA with nonfinite='skip' "
            "to skip such updates."
        )

    def _poll(self, *, block: bool) -> None:
        """Act on refusals counted on the device that the host has not reported yet: all of them,
        waiting for the device, when ``block``; else only what an earlier copy already brought over."""
        state = self._device
        if state is None:
            return
        if block:
            c = state.read()
            if not self.capturable:
                c = replace(c, step=self._counters.step)
            self._counters = c
            refused, last = int(c.refused), int(c.last_refused)
        else:
            landed = state.landed_refusals()
            if landed is None:
                return
            refused, last = landed
        if refused > state.reported:
            count = refused - state.reported
            state.reported = refused
            self._refuse(None, last, count)

    def _check_model_unchanged(self) -> None:
        """Follow the model: the watch (registrations, slots) and each reader (re-pointed sources)."""
        rebound = self._watch.check()
        if self._shards is not None:  # sharded tensors: the engine reads their (maybe re-pointed) local shards
            rebound = self._shards.follow(rebound)
        for group in self._groups:
            if rebound:
                group.sources = [rebound.get(k, src) for k, src in zip(group.keys, group.sources)]
            elif not group.reader.moved():
                continue
            for key, src, view in zip(group.keys, group.sources, group.views[0]):
                if src.shape != view.shape:
                    raise ValueError(
                        f"the model changed after the EMA was built: {key!r} has shape {tuple(src.shape)}, "
                        f"the average has {tuple(view.shape)}"
                    )
            if group.plan == "flat":
                log.warning(
                    "polyak: a tensor of an EMA(flatten=True) model was re-assigned (e.g. by model.to(), "
                    ".half() or p.data = ...); it is no longer a view of the flat buffer, so this EMA now reads "
                    "the tensors one by one (slower, same result)"
                )
            self._plan(group)

    def synchronize(self) -> None:
        """Wait for pending device-side finiteness checks and act on them (raise, or count and log skips).

        Only counters on the device (a checked CUDA model, ``capturable=True``) leave checks pending;
        elsewhere this does nothing."""
        self._poll(block=True)

    # --- training-loop hook ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call ``update()`` after every ``optimizer.step()`` (a step post-hook). Returns a
        ``polyak.hooks.StepHook``; ``handle.remove()`` or ``ema.detach()`` stops it.

        One hook per EMA: a second ``attach`` or ``polyak.integrations.loop.update_on_step`` (same optimizer
        or another) raises RuntimeError until the first is removed, since each step would be averaged twice.
        Do not also call ``ema.update()`` yourself. A ``GradScaler`` that skips ``optimizer.step()`` on inf
        gradients skips the update too, which is what you want.
        """
        from polyak import hooks

        return hooks.register(self, optimizer, self.update)

    def detach(self) -> None:
        """Remove the optimizer hook installed by ``attach`` or ``update_on_step`` (no-op when not attached)."""
        from polyak import hooks

        hooks.unregister(self)

    # --- reading the average ---------------------------------------------------------------------------
    def check_index(self, index: int) -> int:
        """``index`` of one of the averages as ``0..num_averages-1`` (negative counts from the end); a
        TypeError or ValueError saying what is wrong otherwise. For code that takes an ``index=``."""
        return _state.check_index(index, self.num_averages)

    def _check_index(self, index: int) -> int:
        return self.check_index(index)

    def _averaged_views(self, group: Group, index: int) -> list[Tensor]:
        """The averaged values of a group in the shadow dtype (bias-corrected when ``debias``)."""
        return _state.debiased(group.views[index], self._products[index], debias=self.debias, live=group.sources)

    def _averaged_by_key(self, index: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for group in self._groups:
            out.update(zip(group.keys, self._averaged_views(group, index)))
        return out

    def module(self, index: int = 0) -> nn.Module:
        """The average as a module: the model's architecture, whose averaged parameters and buffers *are*
        this EMA's shadows (same storage, ``data_ptr`` equal; no second copy), so it is current after
        every ``update()`` and needs no swap. Frozen (``requires_grad=False``), in eval mode; use it for
        evaluation next to the live model, export, or ``torch.compile``.

        Built once per index (later calls return the same module) by copying the module tree with every
        tensor of the state substituted (``copy.deepcopy`` with a memo holding the substitutes: the
        model's ``__init__`` does not run again and no tensor is copied). Wrappers are unwrapped:
        DDP/DataParallel ``module.`` and ``torch.compile``'s ``_orig_mod``.

        Tensors without an average are shared with the live model: excluded parameters, integer
        buffers, buffers under ``buffers="copy"`` and non-persistent buffers are the live tensors
        themselves (as ``apply()`` and ``averaged_state_dict()`` use their live values); a train-mode
        forward of this module would therefore change the live model's ``"copy"`` buffers, so keep it in
        eval mode (``polyak.Teacher`` gives its module buffers of its own). Buffers under
        ``buffers="skip"`` are cloned once, when the module is built.

        The parameters have the shadow dtype (float32 for float16/bfloat16 models: cast the inputs, or
        call ``.half()``, which makes a copy that no longer follows the average). Not available with
        ``debias=True`` (the shadows are not the average there; use ``copy_to`` or
        ``averaged_state_dict``). Moving the module (``.to()``, ``.half()``) detaches it from the EMA.
        """
        index = self._check_index(index)
        if self._shards is not None:
            raise ValueError(
                "ema.module() builds a module over the shadows, but this EMA averages "
                + (
                    "1/world of each parameter per rank (shard=...)"
                    if self._rank_layouts
                    else "DTensor shards (FSDP2, tensor parallelism)"
                )
                + ": each rank holds only its local part. Evaluate with `with ema.apply():` (the averaged weights "
                "are gathered into the model), or get the full average with ema.averaged_state_dict(full=True) "
                "and load it into a copy of the model"
            )
        if self.debias:
            raise ValueError(
                "ema.module() shares the shadow storage, but with debias=True the shadows are not the average "
                "(it is shadow / (1 - prod(beta))); use ema.copy_to(model_copy) or ema.averaged_state_dict()"
            )
        cache: dict[int, nn.Module] = self.__dict__.setdefault("_modules_by_index", {})
        if index not in cache:
            cache[index] = averaged_module(self.model, self._shadow_views(index), self._selected)
        return cache[index]

    def _shadow_views(self, index: int) -> dict[str, Tensor]:
        """The shadow tensors of average ``index`` by normalised key (the storage itself, not copies)."""
        return {key: view for group in self._groups for key, view in zip(group.keys, group.views[index])}

    @contextmanager
    def apply(self, index: int = 0) -> Iterator[nn.Module]:
        """Inside the block the live model holds the averaged weights; on exit (even on error) the
        training weights are restored exactly. Yields the model.

        Sharded models (FSDP2): the block first reshards every FSDP module (``FSDPModule.reshard()``, local)
        and writes each rank's averaged shards into its local shards, so the model's own forward inside
        the block all-gathers the averaged weights; on exit it reshards again (a forward under no_grad
        leaves the root's unsharded, here averaged, weights in place) and restores the shards. Entering
        and leaving issue no collective; a forward inside the block is the usual FSDP2 collective that
        every rank must make.

        Split over the ranks (``shard=...``): entering is a collective every rank must make, one
        all-gather per shadow group of the averaged columns into the whole live parameters (buffers are
        written locally); leaving restores the training weights from a copy, with no collective."""
        index = self._check_index(index)
        if self._applied:
            raise RuntimeError("ema.apply() is already active; nested apply() blocks are not supported")
        if self._shards is not None:
            _sharding.reshard(self.model)
        self._poll(block=True)
        self._check_model_unchanged()
        # Back up the averaged tensors and every other buffer too: code inside the block (a forward pass
        # in train mode, polyak.update_bn) may change BatchNorm statistics that are not averaged. Split
        # over the ranks (shard=...), the whole live parameters: the all-gather writes every element.
        replicas = self._replicas() or {}
        live = list(replicas.values()) + [
            s for g in self._groups for k, s in zip(g.keys, g.sources) if k not in replicas
        ]
        live += [s.tensor for s in self._selected if s.is_buffer and s.mode != "average"]
        with torch.no_grad():
            backup = [t.detach().clone() for t in live]
            self._applied = True
            try:
                for group in self._groups:  # what this rank holds whole (everything, unless split)
                    whole = [i for i, k in enumerate(group.keys) if k not in replicas]
                    averaged = self._averaged_views(group, index)
                    _kernels.copy_([group.sources[i] for i in whole], [averaged[i] for i in whole])
                if replicas:  # split over the ranks: one all-gather per shadow group
                    self._gather_into(replicas, index)
            except BaseException:
                self._restore(live, backup)
                raise
        try:
            yield self.model
        finally:
            with torch.no_grad():
                try:
                    if self._shards is not None:  # drop the unsharded averaged weights a forward left behind
                        _sharding.reshard(self.model)
                finally:
                    self._restore(live, backup)

    def _replicas(self) -> Mapping[str, Tensor] | None:
        """Split over the ranks (``shard=...``): the whole live parameters by key, which every rank holds
        (DDP's replicas); None otherwise."""
        return self._shards.live if self._rank_layouts and self._shards is not None else None

    def _gather_into(self, targets: Mapping[str, Tensor], index: int) -> None:
        """Split over the ranks: write average ``index`` into ``targets`` (whole tensors by key, any
        dtype): one all-gather per shadow group, a collective every rank must make."""
        averaged = self._averaged_by_key(index)
        for layout in self._rank_layouts:
            layout.gather_(averaged, targets)

    def _restore(self, live: list[Tensor], backup: list[Tensor]) -> None:
        _kernels.copy_(live, backup)
        self._applied = False

    def averaged_state_dict(self, index: int = 0, *, full: bool = False) -> dict[str, Any]:
        """The model's ``state_dict()`` with averaged tensors (in the model's dtype) in place of the live
        ones; loadable by ``model.load_state_dict``. Buffers under ``buffers="skip"`` are left out (load
        with ``strict=False``). Every tensor is a fresh copy.

        Sharded models (DTensor parameters): the averages are DTensors with the model's placements, global
        shape and stride (no collective). ``full=True`` is a collective every rank must call: it gathers
        one tensor at a time and moves it to the CPU on rank 0, which gets the full state dict (the other
        ranks get an empty dict); rank 0 holds at most one full tensor beyond its shards on the
        accelerator. Split over the ranks (``shard=...``) the same, where each parameter's average is this
        rank's flat range of it (a ``FlatRangeShard`` of the full shape) and each buffer's is whole.
        Without sharding ``full`` changes nothing."""
        index = self._check_index(index)
        full = as_bool(full, "full")
        self._poll(block=True)
        self._check_model_unchanged()
        # a tied tensor (e.g. embedding = output head) has one average under several keys
        aliases = {key: s.key for s in self._selected for key in s.model_keys}
        skipped = {k for s in self._selected if s.mode == "skip" for k in s.model_keys}
        averaged = self._averaged_by_key(index)
        if self._shards is not None:
            averaged = self._shards.wrap(averaged)
        state = _state.model_state_with(averaged, self.model.state_dict(), aliases=aliases, skip=skipped)
        if full and self._shards is not None:
            return dict(_sharding.full_items(state))
        return state

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Write the averaged weights into ``model`` (same architecture; wrapper prefixes may differ).

        Everything is checked before anything is written: missing/unexpected keys and shape mismatches
        raise a ValueError and leave ``model`` untouched. Split over the ranks (``shard=...``) this is a
        collective every rank must make: one all-gather per shadow group, before the checks.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"copy_to expects a torch.nn.Module, got {type(model).__name__}")
        index = self._check_index(index)
        self._poll(block=True)
        self._check_model_unchanged()
        targets = select(model, include=None, exclude=None, buffers="copy")
        averaged = self._averaged_by_key(index)
        replicas = self._replicas()
        if replicas is not None:  # split over the ranks: one all-gather per group, into whole tensors
            local = averaged
            averaged = {k: v.new_empty(replicas[k].shape) if k in replicas else v for k, v in local.items()}
            for layout in self._rank_layouts:
                layout.gather_(local, averaged)
        elif self._shards is not None:
            averaged = self._shards.wrap(averaged)
        pairs = copy_pairs(self._selected, targets, averaged)
        if self._shards is not None and replicas is None:
            pairs = _sharding.local_pairs(pairs)
        _kernels.copy_([d for d, _ in pairs], [s for _, s in pairs])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, decay products, and every shadow (fresh copies, normalised
        keys, shadow dtype). Loadable with ``torch.load(weights_only=True)``; a sharded EMA's averages are
        DTensors or ``FlatRangeShard`` ranges (no collective), for ``torch.distributed.checkpoint``."""
        self._poll(block=True)
        self._check_model_unchanged()
        averages = [
            {key: view.detach().clone() for group in self._groups for key, view in zip(group.keys, group.views[k])}
            for k in range(self.num_averages)
        ]
        if self._shards is not None:  # DTensors: torch.distributed.checkpoint saves and reshards them
            averages = [self._shards.wrap(a) for a in averages]
        return _state.build(
            step=self.step,
            skipped_updates=self.skipped_updates,
            products=self._products,
            last_decays=self.last_decays,
            config=_state.config_of(self),
            averages=averages,
        )

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output. Everything is validated before anything changes: a foreign or
        corrupt state, impossible counters (a negative or non-integer count, a decay product outside
        [0, 1]), missing/unexpected keys, shape or dtype mismatches and NaN/inf raise ValueError."""
        if self._shards is not None:  # each rank takes its part of full tensors or of DTensors
            state_dict = self._shards.localize(state_dict)
        state = _state.parse(state_dict)
        views = {
            key: [g.views[k][i] for k in range(self.num_averages)] for g in self._groups for i, key in enumerate(g.keys)
        }
        plan = _state.plan_load(state, views, num_averages=self.num_averages, debias=self.debias)
        self._warn_on_config_change(state.config)
        _kernels.copy_([d for d, _ in plan], [v for _, v in plan])
        self.skipped_updates = state.skipped_updates
        self._set_counters(step=state.step, products=tuple(state.products), last_decays=tuple(state.last_decays))

    def _warn_on_config_change(self, saved: Mapping[str, Any]) -> None:
        """Log (once per load) the settings that differ from the saved ones: the EMA keeps its own, as an
        optimizer built with a new learning rate would, but a silent change of decay on resume is a
        common mistake."""
        changed = _state.config_changes(saved, _state.config_of(self))
        if changed:
            log.warning(
                "polyak: loading an EMA state saved with other settings (%s); this EMA continues with its own",
                "; ".join(changed),
            )
