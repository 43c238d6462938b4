"""``EMA``: an exponential (or uniform) moving average of a model's weights, matched by name.

A facade: it holds the typed state that ``_build`` made (a frozen ``Config``, the selection, the
placement, the watch, the shadow groups, the counters) and calls one engine for every mode, in the order
of ``docs/architecture.md``: ``_watch`` (has the model changed?), ``_decide`` (what this call does),
``_engine`` (read each shadow group's live weights, lerp), ``_verdict`` (the finiteness check and the
``nonfinite`` policy), ``_counters`` (the bookkeeping, on the host or on the device). Where the
averages live across ranks is ``_placement``'s business, so no method branches on sharding. The model is
never deep-copied: shadows are flat buffers keyed by the model's normalised parameter names (``_layout``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _engine, _kernels, _state
from polyak._build import NONFINITE_POLICIES as NONFINITE_POLICIES  # the accepted nonfinite values
from polyak._build import NonFinitePolicy, build, configure, flag_on_cuda, ledger, replan
from polyak._counters import Counters, DeviceCounters
from polyak._decide import Decision, TensorDecision, decay_product, decide, decide_tensor
from polyak._layout import Group
from polyak._module import averaged_module, check_shadows_shareable
from polyak._select import BufferPolicy, Pattern, Selected, select
from polyak._validate import as_bool, as_int
from polyak._verdict import refuse, verdict
from polyak.schedules import DEFAULT_DECAY

__all__ = ["EMA", "NonFinitePolicy"]

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
        config = configure(
            model,
            decay,
            start_step=start_step,
            update_every=update_every,
            buffers=buffers,
            dtype=dtype,
            device=device,
            debias=debias,
            nonfinite=nonfinite,
            flatten=flatten,
            capturable=capturable,
        )
        self._config = config  # the settings, read-only below: the engine was planned for them
        self.model = model
        self.skipped_updates = 0  # updates refused by nonfinite="skip" (and reported)
        self._applied = False
        engine = build(model, config, include=include, exclude=exclude, shard=shard)
        self._selected: list[Selected] = engine.selected
        self._storage = engine.storage  # where the averages live across ranks (polyak._placement)
        self._shards = self._storage.shards  # DTensor shards or rank slices by key (polyak._sharding), or None
        self._watch = engine.watch
        self._groups: list[Group] = engine.groups
        self._ledger = ledger(self._groups, config, on_cuda=self._check_on_device())  # host or device counters

    # --- the settings: fixed when the EMA is built (assigning one raises; build a new EMA instead) -------
    @property
    def schedules(self) -> tuple[Callable[[int], float], ...]:
        """One decay schedule per average (a float ``decay`` becomes ``schedules.constant``)."""
        return self._config.schedules

    @property
    def start_step(self) -> int:
        return self._config.start_step

    @property
    def update_every(self) -> int:
        return self._config.update_every

    @property
    def buffers(self) -> BufferPolicy:
        return self._config.buffers

    @property
    def dtype(self) -> torch.dtype | None:
        return self._config.dtype

    @property
    def device(self) -> torch.device | None:
        return self._config.device

    @property
    def debias(self) -> bool:
        return self._config.debias

    @property
    def nonfinite(self) -> NonFinitePolicy:
        return self._config.nonfinite

    @property
    def flatten(self) -> bool:
        return self._config.flatten

    @property
    def capturable(self) -> bool:
        return self._config.capturable

    def _check_on_device(self) -> bool:
        """True when the finiteness flag lives on a CUDA device (read it later, never in update())."""
        return flag_on_cuda(self._groups)

    @property
    def update_plans(self) -> list[tuple[str, str, str, int]]:
        """How each shadow group is read: ``(device, dtype, plan, number of tensors)``, where plan is
        ``"foreach"``, ``"gather"``, ``"flat"`` or ``"offload"`` (see ``polyak._readers``)."""
        return [(str(g.device), str(g.dtype), g.plan, len(g.sources)) for g in self._groups]

    # --- the engine's state, by the names the rest of the package reads ------------------------------------
    @property
    def _counters(self) -> Counters:
        return self._ledger.host

    @property
    def _device(self) -> DeviceCounters | None:
        return self._ledger.device

    @property
    def _products(self) -> list[float]:
        """prod(beta) over every accepted averaging update, per average (a copy counts as beta = 0)."""
        return list(self._ledger.read().products)

    @_products.setter
    def _products(self, value: Sequence[float]) -> None:
        self._ledger.set(products=tuple(float(p) for p in value))

    # --- public properties -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Calls of ``update()`` so far. With ``capturable=True`` the counter lives on the device and
        reading it waits for the device (a sync)."""
        return int(self._ledger.read().step)

    @step.setter
    def step(self, value: int) -> None:
        self._ledger.set(step=as_int(value, "step", minimum=0))

    @property
    def last_decays(self) -> tuple[float, ...]:
        """The decay of each average at the last averaging update (0.0 after a copy). When the counters
        live on the device (``capturable=True``, a checked CUDA model) reading it waits for the device."""
        return tuple(self._ledger.read().last_decays)

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
            f"{self._storage.describe})"
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
        config, ledger = self._config, self._ledger
        compiling = torch.compiler.is_compiling()
        if not config.capturable:
            self._poll(block=False)
        if not compiling:  # host-side checks only (no device read); dynamo guards itself
            self._check_model_unchanged()
        decision: Decision | TensorDecision
        if config.capturable and ledger.device is not None:
            step = ledger.device.step + 1
            decision = decide_tensor(config.tensor_schedules, step, config.start_step, config.update_every)
        else:
            decision = decide(config.schedules, ledger.host.step + 1, config.start_step, config.update_every)
            if not decision.active:
                ledger.advance(decision, True)
                return
        try:
            sources = self._read(compiling)
            flag_device = None if ledger.device is None else ledger.device.step.device
            ok = verdict(self._groups, sources, config.nonfinite, flag_device, self._storage)
            if isinstance(ok, list):  # refused on the host (the tensors named): no shadow is written
                # "raise" raises here: the call is not counted
                self.skipped_updates += refuse(config.nonfinite, ok, ledger.host.step + 1)
                ledger.advance(decision, False)
                return
            _engine.lerp_(self._groups, sources, decision.weights, ok)
        except RuntimeError:
            self._watch.verify(strict_identity=False)  # raises a clear error if the model changed
            raise
        ledger.advance(decision, ok)

    def _read(self, compiling: bool) -> list[Tensor | None]:
        """Every group's flat source (``_engine.read``). Nothing is written before this returns, so a
        reader that fails (a tensor moved to another device or shape since it was built) is replaced and
        read once more, after the model walk has raised a clear error for a changed shape."""
        try:
            return _engine.read(self._groups, compiling)
        except RuntimeError:
            rebound = self._storage.follow(self._watch.verify(strict_identity=False))
            for group in self._groups:
                group.sources = [rebound.get(k, src) for k, src in zip(group.keys, group.sources)]
            replan(self._groups, self._config)
            return _engine.read(self._groups, compiling)

    def _poll(self, *, block: bool) -> None:
        """Act on refusals counted on the device that the host has not reported yet (``Ledger.unreported``)."""
        count, last = self._ledger.unreported(block=block)
        if count:
            self.skipped_updates += refuse(self._config.nonfinite, None, last, count)

    def _check_model_unchanged(self) -> None:
        """Follow the model: the watch (registrations, slots) and each reader (re-pointed sources)."""
        rebound = self._storage.follow(self._watch.check())  # sharded: the (maybe re-pointed) local shards
        replan(_engine.follow(self._groups, rebound), self._config)

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
        check_shadows_shareable(self._storage.module_refusal, debias=self.debias)
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
        self._storage.reshard(self.model)
        self._poll(block=True)
        self._check_model_unchanged()
        live = self._storage.swapped(self._groups, self._selected)
        with torch.no_grad():
            backup = [t.detach().clone() for t in live]
            self._applied = True
            try:
                self._storage.write_(self._groups, [self._averaged_views(g, index) for g in self._groups])
            except BaseException:
                self._restore(live, backup)
                raise
        try:
            yield self.model
        finally:
            with torch.no_grad():
                try:
                    self._storage.reshard(self.model)  # drop the unsharded averaged weights a forward left
                finally:
                    self._restore(live, backup)

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
        averaged = self._storage.state_values(self._averaged_by_key(index))
        state = _state.model_state_with(averaged, self.model.state_dict(), aliases=aliases, skip=skipped)
        return self._storage.full(state) if full else state

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
        pairs = self._storage.copy_pairs(self._selected, targets, self._averaged_by_key(index))
        _kernels.copy_([d for d, _ in pairs], [s for _, s in pairs])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, decay products, and every shadow (fresh copies, normalised
        keys, shadow dtype). Loadable with ``torch.load(weights_only=True)``; a sharded EMA's averages are
        DTensors or ``FlatRangeShard`` ranges (no collective), for ``torch.distributed.checkpoint``."""
        self._poll(block=True)
        self._check_model_unchanged()
        averages = [  # sharded: DTensors or flat ranges, which torch.distributed.checkpoint saves and reshards
            self._storage.state_values({k: v.detach().clone() for k, v in self._shadow_views(index).items()})
            for index in range(self.num_averages)
        ]
        return _state.build(
            step=self.step,
            skipped_updates=self.skipped_updates,
            products=self._products,
            last_decays=self.last_decays,
            config=_state.config_of(self._config),
            averages=averages,
        )

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output. Everything is validated before anything changes: a foreign or
        corrupt state, impossible counters (a negative or non-integer count, a decay product outside
        [0, 1]), missing/unexpected keys, shape or dtype mismatches and NaN/inf raise ValueError."""
        state = _state.parse(self._storage.localize(state_dict))  # sharded: each rank takes its part
        views = {
            key: [g.views[k][i] for k in range(self.num_averages)] for g in self._groups for i, key in enumerate(g.keys)
        }
        writes = _state.plan_load(state, views, num_averages=self.num_averages, debias=self.debias)
        _state.warn_on_config_change(state.config, _state.config_of(self._config))
        _kernels.copy_([d for d, _ in writes], [v for _, v in writes])
        self.skipped_updates = state.skipped_updates
        self._ledger.set(step=state.step, products=tuple(state.products), last_decays=tuple(state.last_decays))
