"""``EMA``: an exponential (or uniform) moving average of a model's weights, matched by name.

The class is thin: it validates once, holds typed state (step counter, decay products, shadow groups)
and calls the pure kernels in ``polyak._kernels``. The model is never deep-copied: shadows are flat
buffers keyed by the model's normalised parameter names (see ``polyak._storage``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polyak import _capturable, _kernels, _state
from polyak._select import BufferPolicy, Pattern, Selected, select
from polyak._storage import Group, build_groups, copy_to_host, flatten_sources, plan_group, sources_moved
from polyak.schedules import DEFAULT_DECAY, TensorSchedule, as_schedule

__all__ = ["EMA", "NonFinitePolicy"]

log = logging.getLogger("polyak")

NonFinitePolicy = Literal["raise", "skip", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip", "ignore")
STATE_FORMAT = _state.STATE_FORMAT
STATE_VERSION = _state.STATE_VERSION

DecayLike = float | Callable[[int], float]

# --- detecting a model that changed after the EMA was built ------------------------------------------
# torch calls these process-wide hooks whenever any module registers a parameter, buffer or submodule.
# They only bump a counter; an EMA re-checks its model (a full walk) only when the counter has moved, so
# the common update costs one integer comparison instead of a walk over thousands of tensors.
_generation = 0
_hooks_installed = False


def _bump_generation(*_: object) -> None:
    global _generation
    _generation += 1


def _install_registration_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.nn.modules import module as torch_module

    torch_module.register_module_parameter_registration_hook(_bump_generation)
    torch_module.register_module_buffer_registration_hook(_bump_generation)
    torch_module.register_module_module_registration_hook(_bump_generation)
    _hooks_installed = True


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _refuse_sharded(selected: list[Selected]) -> None:
    """DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) hold one shard per rank behind a
    global shape: averaging them needs each rank to average its own shard, which is not built yet. Say
    so, instead of failing later inside a foreach kernel with 'mixed torch.Tensor and DTensor'."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: nothing to import or check
        return
    from torch.distributed.tensor import DTensor

    sharded = [s.key for s in selected if s.mode == "average" and isinstance(s.tensor, DTensor)]
    if sharded:
        raise ValueError(
            f"{len(sharded)} tensor(s) of the model are DTensors (sharded by FSDP2's fully_shard or tensor "
            f"parallelism), e.g. {sharded[:3]}; polyak cannot average sharded parameters yet. Use DDP "
            "(supported: every rank averages the full model), or include=/exclude= to average only the "
            "tensors that are not sharded"
        )


class EMA:
    """A moving average of a model's parameters (and float buffers), held as named shadow tensors.

    Update rule, at the t-th averaging update (t counts calls after ``start_step``)::

        shadow <- beta_t * shadow + (1 - beta_t) * weight          (computed as shadow.lerp_(weight, 1 - beta_t))

    Args:
        model: the live model (plain, DDP/DataParallel-wrapped or ``torch.compile``d); never copied.
        decay: a float in [0, 1) (constant decay), a schedule ``t -> beta_t`` from ``polyak.schedules``,
            or a sequence of those to keep several averages at once (``index=`` selects one). Default:
            ``schedules.DEFAULT_DECAY``, the power-function EMA ``(1 - 1/t) ** 17.97`` (EDM2, sigma_rel 0.05).
        start_step: for the first ``start_step`` calls of ``update()`` the shadow copies the weights.
        update_every: average on every k-th call only, with the decays of the k steps multiplied
            (``beta**k`` for a constant beta), so the result does not depend on k when the weights are
            constant between updates.
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
            the tensors and leave the average untouched (default), ``"skip"`` that update (logged), or
            ``"ignore"`` (no check; fastest; the NaN enters the average). The check reads every weight
            once more: on CPU one sum per tensor (finite only if every element is; an overflowing sum is
            re-checked exactly with ``aminmax``, so no false alarms), read before anything is written.
            On CUDA the update never waits for the device: the flag stays on the device and masks the
            update (a non-finite update leaves every average bit-for-bit unchanged), a copy of it
            travels to pinned host memory, and the error (``"raise"``) or the skip count and log line
            (``"skip"``) happen at the next point where the host looks: the next ``update()`` whose
            flag copy has landed, or ``apply``/``copy_to``/``averaged_state_dict``/
            ``state_dict``/``synchronize()``, which wait for it.
        flatten: opt-in speed-up for models with many small tensors: make the model's averaged tensors
            views into one contiguous buffer per (device, dtype), laid out like the shadows, so an update
            is one flat ``lerp_`` per average with no gather (as FSDP/DeepSpeed flat parameters do).
            Parameters keep their identity (``p.data`` is re-pointed), so an optimizer built before or
            after keeps working; build the EMA before ``torch.compile``, DDP/FSDP wrapping, or anything
            that records parameter addresses (CUDA graphs). If a parameter is later re-assigned (e.g.
            ``model.half()``, ``p.data = ...``), the next update notices, logs a warning and falls back
            to the default path. The check costs one read of the flat buffer's storage use count per
            update; only when that count changes are the tensors' ``data_ptr`` compared. A re-assignment
            made while a new view of a parameter is created and kept alive across the same ``update()``
            leaves the count unchanged and is not seen (see ``_storage.sources_moved``).
        capturable: opt-in (the name follows ``torch.optim``'s ``capturable=True``): the step counter, the
            debias products and the count of refused updates live as tensors on the shadow device, and
            ``update()`` runs the same tensor ops on every call, with no host read and no Python branch on
            the step, so a CUDA graph can capture it (``torch.cuda.graph``, or ``torch.compile(...,
            mode="reduce-overhead")`` around the training step) and ``torch.compile(fullgraph=True)``
            traces it once, without recompiling as the step advances. Each decay is computed on the device
            from the step by the schedule's tensor form (``at_tensor``: every built-in schedule has one; a
            plain callable raises a TypeError) in float64; a copy (``start_step``) is lerp weight 1 and an
            off-step of ``update_every`` weight 0, chosen by ``torch.where``; the weight is cast to the
            shadow's compute dtype as the default path casts its Python float. The shadows equal the
            default path's bit for bit on CPU (tested), except that ``ultralytics`` uses ``torch.exp``,
            which can differ from ``math.exp`` in the last bit of float64 (``polyak.schedules``), and a -0.0
            in a shadow may become +0.0 (lerp arithmetic: -0.0 + 0.0 is +0.0). The finiteness check masks the
            update on the device (a refused update leaves every average and the debias products
            unchanged, and is counted there); the host looks only in ``synchronize()``, ``apply``,
            ``copy_to``, ``averaged_state_dict`` and ``state_dict``, where ``"raise"`` raises and
            ``"skip"`` adds to ``skipped_updates``. Reading ``ema.step``, ``ema.last_decays`` or
            ``repr(ema)`` waits for the device (a sync). Costs: 35 to 100 tiny ops per update (58 for one
            average with the check, 101 for three with ``update_every=2``), free inside a CUDA graph or
            fused by inductor but launch-bound when run eagerly; off-steps do the full work with weight 0;
            no cache-blocking for K > 1. Not supported: shadows on another device than the weights
            (``device="cpu"`` offload: ValueError). After capturing or compiling, do not re-assign
            parameters (``p.data = ...``, ``model.to()``): a captured graph keeps reading the old memory.
            Under ``nonfinite="ignore"`` an inf weight on an off-step still reaches the average
            (``lerp(s, inf, 0)`` is NaN), unlike the default path.

    Layout and speed: shadows live in one ``(K, N)`` buffer per (device, dtype). Groups of many small
    tensors are gathered with one ``torch.cat`` per update (when K > 1 or the NaN check reads the flat
    source too) and updated by flat ``lerp_`` calls; groups of
    large tensors use ``_foreach_lerp_`` (K = 1) or a cache-blocked per-tensor loop (K > 1) that reads each
    weight from memory about once for all K averages. A gathered group keeps one scratch buffer of N
    elements (one more shadow's worth of memory for that group). Every path runs the reference arithmetic
    ``shadow.lerp_(weight.to(shadow.dtype), 1 - beta)`` and gives the same bits.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA expects a torch.nn.Module, got {type(model).__name__}")
        decays: Sequence[DecayLike] = decay if isinstance(decay, (list, tuple)) else [decay]  # type: ignore[list-item]
        if not decays:
            raise ValueError("decay is an empty sequence; pass a float, a schedule, or a non-empty list")
        self.schedules: tuple[Callable[[int], float], ...] = tuple(as_schedule(d) for d in decays)
        for i, schedule in enumerate(self.schedules):
            self._checked_decay(schedule, 1, i)  # fail at construction, not at the first update
        self.start_step = _check_int(start_step, "start_step", 0)
        self.update_every = _check_int(update_every, "update_every", 1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
        if not isinstance(debias, bool):
            raise TypeError(f"debias must be a bool, got {debias!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool, got {flatten!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        tensor_schedules: list[TensorSchedule] = []
        for i, schedule in enumerate(self.schedules if capturable else ()):
            if not isinstance(schedule, TensorSchedule):
                raise TypeError(
                    f"EMA(capturable=True) computes each decay on the device, but schedule {schedule!r} "
                    f"(decay index {i}) has no tensor form. Use a float or a schedule from polyak.schedules, "
                    "give your schedule an `at_tensor(t: Tensor) -> Tensor` method computing the same "
                    "formula with torch ops (see polyak.schedules.TensorSchedule), or pass capturable=False"
                )
            tensor_schedules.append(schedule)
        self._tensor_schedules = tuple(tensor_schedules)  # the schedules again, typed, when capturable

        self.model = model
        self.buffers: BufferPolicy = buffers
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.debias = debias
        self.nonfinite: NonFinitePolicy = nonfinite
        self._include = include
        self._exclude = exclude

        self._step = 0  # calls of update(); with capturable, a host copy of _device.step (see `step`)
        self.skipped_updates = 0  # updates refused by nonfinite="skip"
        self._last_decays: tuple[float, ...] = tuple(0.0 for _ in self.schedules)
        # prod(beta) over every averaging update per average; 1.0 is the empty product. With debias the
        # average is shadow / (1 - product); a copy counts as beta = 0.
        self._products: list[float] = [1.0 for _ in self.schedules]
        self._applied = False
        self.flatten = flatten
        self.capturable = capturable
        # capturable=True: the counters as device tensors; the host fields above are copies refreshed by
        # _poll(block=True). None otherwise.
        self._device: _capturable.DeviceState | None = None
        # CUDA only: (step, decays or None for a copy, host flag, event) of device-side finiteness checks
        # whose result the host has not looked at yet.
        self._pending: list[tuple[int, tuple[float, ...] | None, Tensor, Any]] = []
        self._hooks: list[Any] = []

        _install_registration_hooks()
        self._generation = _generation
        self._selected: list[Selected] = select(model, include=include, exclude=exclude, buffers=buffers)
        _refuse_sharded(self._selected)
        self._buffer_slots = self._find_buffer_slots()
        self._param_probes = self._find_param_probes()
        self._groups: list[Group] = build_groups(
            self._selected, num_averages=len(self.schedules), dtype=dtype, device=self.device
        )
        if capturable:
            self._device = self._capturable_state()
        with torch.no_grad():
            for group in self._groups:
                for views in group.views:
                    if debias:
                        group.flat.zero_()
                    else:
                        _kernels.copy_(views, group.sources)
        for group in self._groups:
            self._plan(group)
            if flatten and not flatten_sources(group):
                log.info(
                    "polyak: EMA(flatten=True) left %d tensor(s) of shadow group (%s, %s) as they are: "
                    "they differ in dtype/device or are not contiguous",
                    len(group.sources),
                    group.device,
                    group.dtype,
                )

    def _plan(self, group: Group) -> None:
        # On CUDA (and always when capturable) the finiteness check masks the update on the device, which
        # needs a flat source.
        masked = (group.device.type == "cuda" or self.capturable) and self.nonfinite != "ignore"
        plan_group(group, self.num_averages, check=self.nonfinite != "ignore", force_gather=masked)

    @property
    def update_plans(self) -> list[tuple[str, str, str, int]]:
        """How each shadow group is updated: ``(device, dtype, plan, number of tensors)``, where plan is
        ``"foreach"``, ``"gather"`` or ``"flat"`` (see the class docstring)."""
        return [(str(g.device), str(g.dtype), g.plan, len(g.sources)) for g in self._groups]

    def _capturable_state(self) -> _capturable.DeviceState:
        for group in self._groups:
            moved = sorted({str(s.device) for s in group.sources if s.device != group.device})
            if moved:
                raise ValueError(
                    f"EMA(capturable=True) keeps the shadows on the weights' device, but shadows on {group.device} "
                    f"were asked for weights on {', '.join(moved)} (device={str(self.device)!r}); copying the weights "
                    "to another device every update cannot be captured. Leave device=None, or use capturable=False "
                    "for an offloaded average"
                )
        device = self._groups[0].device if self._groups else (self.device or torch.device("cpu"))
        for i, schedule in enumerate(self._tensor_schedules):
            self._check_tensor_form(schedule, i, device)
        return _capturable.DeviceState.create(device, self.num_averages)

    @staticmethod
    def _check_tensor_form(schedule: TensorSchedule, index: int, device: torch.device) -> None:
        """Once, at construction: the tensor form returns a floating tensor that agrees with ``schedule(t)``."""
        for t in (1, 2, 1000):
            value = schedule.at_tensor(torch.full((), t, dtype=torch.int64, device=device))
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.shape != ():
                raise TypeError(
                    f"schedule {schedule!r} (decay index {index}): at_tensor(t) must return a floating tensor "
                    f"shaped like t (here 0-dim), got {value!r}"
                )
            expected = EMA._checked_decay(schedule, t, index)
            if abs(float(value) - expected) > 1e-6:
                raise ValueError(
                    f"schedule {schedule!r} (decay index {index}): at_tensor({t}) = {float(value)!r} but "
                    f"schedule({t}) = {expected!r}; the tensor form must compute the same formula"
                )

    # --- public properties -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Calls of ``update()`` so far. With ``capturable=True`` the counter lives on the device and
        reading it waits for the device (a sync)."""
        if self._device is not None:
            self._step = int(self._device.step.item())
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = _check_int(value, "step", 0)
        if self._device is not None:
            self._device.step.fill_(self._step)

    @property
    def last_decays(self) -> tuple[float, ...]:
        """The decay of each average at the last averaging update (0.0 after a copy). With
        ``capturable=True`` reading it waits for the device (a sync)."""
        if self._device is not None:
            self._last_decays = tuple(float(d) for d in self._device.last_decays.tolist())
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
            f"buffers={self.buffers!r}, debias={self.debias}{', capturable=True' if self.capturable else ''})"
        )

    # --- the update ------------------------------------------------------------------------------------
    def decays_at(self, t: int) -> tuple[float, ...]:
        """The decay of each average at averaging step ``t`` (product over the ``update_every`` steps)."""
        lo = max(1, t - self.update_every + 1)
        out = []
        for i, schedule in enumerate(self.schedules):
            value = 1.0
            for s in range(lo, t + 1):
                value *= self._checked_decay(schedule, s, i)
            out.append(value)
        return tuple(out)

    @staticmethod
    def _checked_decay(schedule: Callable[[int], float], t: int, index: int) -> float:
        value = schedule(t)
        if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(
                f"schedule {schedule!r} (decay index {index}) returned {type(value).__name__} at t={t}; "
                "a schedule must return a Python float (no tensors: reading one would sync the device)"
            )
        if not (0.0 <= value < 1.0):
            raise ValueError(
                f"schedule {schedule!r} (decay index {index}) returned {value!r} at t={t}; decays must be in [0, 1)"
            )
        return float(value)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average. Call after ``optimizer.step()``.

        Never reads a value back from a CUDA device (see ``nonfinite`` for when a NaN is reported).
        """
        if self._applied:
            raise RuntimeError(
                "ema.update() was called inside `with ema.apply():`; the live model holds the averaged "
                "weights there. Update outside the block."
            )
        if self._device is not None:
            self._update_on_device(self._device)
            return
        self._poll(block=False)
        self._check_model_unchanged()
        t = self._step + 1 - self.start_step
        if t <= 0:
            if self._fold(None):
                self._products = [0.0 for _ in self.schedules]
                self._last_decays = tuple(0.0 for _ in self.schedules)
            self._step += 1
            return
        if t % self.update_every:
            self._step += 1
            return
        decays = self.decays_at(t)
        if self._fold(decays):
            self._last_decays = decays
            self._products = [p * d for p, d in zip(self._products, decays)]
        self._step += 1

    def _update_on_device(self, state: _capturable.DeviceState) -> None:
        """capturable=True: the same tensor ops on every call, no host read (see ``polyak._capturable``)."""
        if not torch.compiler.is_compiling():  # host-side checks only (no device read); dynamo guards itself
            self._check_model_unchanged()
            for group in self._groups:
                self._refresh_plan(group)
        state.step.add_(1)
        decision = _capturable.decide(self._tensor_schedules, state.step, self.start_step, self.update_every)
        try:
            sources = [self._device_source(group) for group in self._groups]
            ok: Tensor | None = None
            if self.nonfinite != "ignore" and self._groups:
                ok = torch.stack([f.to(state.step.device) for f in self._flags(sources)]).all()
            for group, src in zip(self._groups, sources):
                dtype = _kernels.lerp_weight_dtype(group.dtype)
                weights = decision.weights.to(device=group.device, dtype=dtype)
                gok = None if ok is None else ok.to(group.device)
                if src is None:
                    _kernels.lerp_lists_weighted_(group.views, group.sources, weights, gok)
                else:
                    _kernels.lerp_rows_weighted_(group.flat, src, weights, gok)
        except RuntimeError:
            self._verify_model(strict_identity=False)  # raises a clear error if the model changed
            raise
        _capturable.commit_(state, decision, ok)

    def _device_source(self, group: Group) -> Tensor | None:
        """The capturable update's flat source. Under ``torch.compile``, for real floating sources on the
        shadow's device: a plain ``cat`` of the live tensors, which inductor fuses into the lerp (no
        scratch copy, and no cached view left stale by a re-assigned parameter); otherwise the plan's."""
        if torch.compiler.is_compiling() and all(
            s.is_floating_point() and s.device == group.device for s in group.sources
        ):
            return torch.cat([s.detach().reshape(-1).to(group.dtype) for s in group.sources])
        return self._flat_source(group)

    def _fold(self, decays: tuple[float, ...] | None) -> bool:
        """Lerp every shadow towards its source (a copy when ``decays`` is None). Returns False when the
        update was refused by the finiteness check (policy "skip"; "raise" raises)."""
        weights = [1.0] * self.num_averages if decays is None else [1.0 - d for d in decays]
        for group in self._groups:
            self._refresh_plan(group)
        try:
            sources = [self._flat_source(group) for group in self._groups]
            check = self.nonfinite != "ignore"
            if check and self._check_on_device():
                self._fold_masked(sources, weights, decays)
                return True
            if check and not self._all_finite_on_host(sources):
                return False
            for group, src in zip(self._groups, sources):
                if src is None:
                    _kernels.lerp_tensor_major_(group.views, group.sources, weights, same_dtype=group.same_dtype)
                else:
                    _kernels.lerp_rows_(group.flat, src, weights)
        except RuntimeError:
            self._verify_model(strict_identity=False)  # raises a clear error if the model changed
            raise
        return True

    def _check_on_device(self) -> bool:
        """True when the finiteness flag lives on a CUDA device (read it later, never in update())."""
        return any(
            g.device.type == "cuda" or (g.plan != "offload" and g.sources[0].device.type == "cuda")
            for g in self._groups
        )

    def _refresh_plan(self, group: Group) -> None:
        if not sources_moved(group):
            return
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

    @staticmethod
    def _flat_source(group: Group) -> Tensor | None:
        """The group's sources as one contiguous (N,) tensor, or None for the per-tensor path."""
        if group.plan == "flat":
            return group.source_flat
        if group.plan == "gather" and group.scratch is not None:
            return _kernels.gather_(group.source_views, group.scratch)
        if group.plan == "offload":
            return copy_to_host(group)
        return None

    def _flags(self, sources: list[Tensor | None]) -> list[Tensor]:
        return [
            _kernels.all_finite(g.sources) if src is None else _kernels.flat_finite(src)
            for g, src in zip(self._groups, sources)
        ]

    def _all_finite_on_host(self, sources: list[Tensor | None]) -> bool:
        ok = [_kernels.finite_on_host(g.sources if src is None else [src]) for g, src in zip(self._groups, sources)]
        if all(ok):
            return True
        bad = [
            g.keys[i] for g, fine in zip(self._groups, ok) if not fine for i in _kernels.nonfinite_indices(g.sources)
        ]
        return self._refuse(bad, self._step + 1)

    def _refuse(self, bad: list[str] | None, step: int, count: int = 1) -> bool:
        """Apply the policy to a non-finite update: count and log it ("skip") or raise ("raise").
        ``bad`` names the tensors, or is None when the check ran on the device (tensors not identified);
        ``count`` > 1 reports that many refused updates at once, ``step`` being the last of them."""
        where = (
            f"in {len(bad)} weight tensor(s): {bad[:10]}{' ...' if len(bad) > 10 else ''}"
            if bad is not None
            else "in the weights (checked on the device without naming the tensors)"
        )
        at = f"update step {step}" if count == 1 else f"{count} updates, the last at update step {step}"
        if self.nonfinite == "skip":
            self.skipped_updates += count
            log.warning("polyak: skipped EMA update at %s: NaN/inf %s", at, where)
            return False
        raise ValueError(
            f"non-finite values (NaN or inf) {where} at {at}; the average was left unchanged. "
            "Fix the divergence (lower the learning rate, clip gradients) or build the EMA with "
            "nonfinite='skip' to skip such updates."
        )

    def _fold_masked(
        self, sources: list[Tensor | None], weights: list[float], decays: tuple[float, ...] | None
    ) -> None:
        """CUDA: check and update without a host read. The update is a bit-exact no-op when any weight is
        non-finite (each source is replaced by the shadow itself, and ``lerp(s, s, w) == s``); the flag
        is reported later by ``_poll``."""
        flags = self._flags(sources)
        device = flags[0].device
        ok = torch.stack([f.to(device, non_blocking=True) for f in flags]).all()
        for group, src in zip(self._groups, sources):
            gok = ok.to(group.flat.device)
            if src is not None:
                _kernels.masked_lerp_rows_(group.flat, src, weights, gok)
                continue
            for views, w in zip(group.views, weights):
                masked = [
                    torch.where(gok, s.to(device=v.device, dtype=v.dtype), v) for s, v in zip(group.sources, views)
                ]
                _kernels.lerp_(views, masked, w)
        if ok.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        else:
            host, event = ok, None
        self._pending.append((self._step + 1, decays, host, event))

    def _poll(self, *, block: bool) -> None:
        """Act on the device-side finiteness checks whose result has reached the host (on all of them,
        waiting if needed, when ``block``)."""
        if self._device is not None:
            if block:
                self._sync_device_state(self._device)
            return
        while self._pending:
            step, decays, host, event = self._pending[0]
            if event is not None:
                if block:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.pop(0)
            if bool(host):
                continue
            if decays is not None:  # the masked update changed no shadow: undo its bookkeeping
                self._products = [p / d if d > 0.0 else p for p, d in zip(self._products, decays)]
            if self.nonfinite == "raise":
                self._pending.clear()
            self._refuse(None, step)

    def _sync_device_state(self, state: _capturable.DeviceState) -> None:
        """capturable=True: copy the device counters to the host fields and act on new refusals."""
        self._step, products, last, refused, last_refused = state.read()
        self._products = products
        self._last_decays = tuple(last)
        if refused > state.reported:
            count = refused - state.reported
            state.reported = refused
            self._refuse(None, last_refused, count)

    def synchronize(self) -> None:
        """Wait for pending device-side finiteness checks and act on them (raise, or count and log skips).

        Only CUDA updates and ``capturable=True`` leave checks pending; elsewhere this does nothing."""
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

    @contextmanager
    def apply(self, index: int = 0) -> Iterator[nn.Module]:
        """Inside the block the live model holds the averaged weights; on exit (even on error) the
        training weights are restored exactly. Yields the model."""
        index = self._check_index(index)
        if self._applied:
            raise RuntimeError("ema.apply() is already active; nested apply() blocks are not supported")
        self._poll(block=True)
        self._check_model_unchanged()
        # Back up the averaged tensors and every other buffer too: code inside the block (a forward pass
        # in train mode, polyak.update_bn) may change BatchNorm statistics that are not averaged.
        live = [src for g in self._groups for src in g.sources]
        live += [s.tensor for s in self._selected if s.is_buffer and s.mode != "average"]
        with torch.no_grad():
            backup = [t.detach().clone() for t in live]
            self._applied = True
            try:
                for group in self._groups:
                    _kernels.copy_(group.sources, self._averaged_views(group, index))
            except BaseException:
                self._restore(live, backup)
                raise
        try:
            yield self.model
        finally:
            with torch.no_grad():
                self._restore(live, backup)

    def _restore(self, live: list[Tensor], backup: list[Tensor]) -> None:
        _kernels.copy_(live, backup)
        self._applied = False

    def averaged_state_dict(self, index: int = 0) -> dict[str, Any]:
        """The model's ``state_dict()`` with averaged tensors (in the model's dtype) in place of the live
        ones; loadable by ``model.load_state_dict``. Buffers under ``buffers="skip"`` are left out (load
        with ``strict=False``). Every tensor is a fresh copy."""
        index = self._check_index(index)
        self._poll(block=True)
        self._check_model_unchanged()
        # a tied tensor (e.g. embedding = output head) has one average under several keys
        aliases = {key: s.key for s in self._selected for key in s.model_keys}
        skipped = {k for s in self._selected if s.mode == "skip" for k in s.model_keys}
        return _state.model_state_with(
            self._averaged_by_key(index), self.model.state_dict(), aliases=aliases, skip=skipped
        )

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Write the averaged weights into ``model`` (same architecture; wrapper prefixes may differ).

        Everything is checked before anything is written: missing/unexpected keys and shape mismatches
        raise a ValueError and leave ``model`` untouched.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"copy_to expects a torch.nn.Module, got {type(model).__name__}")
        index = self._check_index(index)
        self._poll(block=True)
        self._check_model_unchanged()
        averaged = self._averaged_by_key(index)
        ours = {s.key: s for s in self._selected}
        target = {s.key: s for s in select(model, include=None, exclude=None, buffers="copy")}
        skipped = {k for k, s in ours.items() if s.mode == "skip"}
        missing = sorted(set(ours) - set(target) - skipped)
        unexpected = sorted(set(target) - set(ours))
        if missing or unexpected:
            raise ValueError(
                "copy_to: the target model does not match the averaged model: "
                f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}; pass a model of the same "
                "architecture"
            )
        pairs: list[tuple[Tensor, Tensor]] = []
        for key, dst in target.items():
            if key in skipped:
                continue
            src = averaged[key] if key in averaged else ours[key].tensor
            if dst.tensor.shape != src.shape:
                raise ValueError(
                    f"copy_to: shape mismatch for {key!r}: averaged {tuple(src.shape)} vs target "
                    f"{tuple(dst.tensor.shape)}"
                )
            pairs.append((dst.tensor, src))
        _kernels.copy_([d for d, _ in pairs], [s for _, s in pairs])

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, decay products, and every shadow (fresh copies, normalised
        keys, shadow dtype). Loadable with ``torch.load(weights_only=True)``."""
        self._poll(block=True)
        self._check_model_unchanged()
        averages = [
            {key: view.detach().clone() for group in self._groups for key, view in zip(group.keys, group.views[k])}
            for k in range(self.num_averages)
        ]
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
        state = _state.parse(state_dict)
        views = {
            key: [g.views[k][i] for k in range(self.num_averages)] for g in self._groups for i, key in enumerate(g.keys)
        }
        plan = _state.plan_load(state, views, num_averages=self.num_averages, debias=self.debias)
        self._warn_on_config_change(state.config)
        _kernels.copy_([d for d, _ in plan], [v for _, v in plan])
        self._step = state.step
        self.skipped_updates = state.skipped_updates
        self._products = list(state.products)
        self._last_decays = state.last_decays
        if self._device is not None:
            self._device.load(self._step, self._products, self._last_decays)

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

    # --- model integrity -------------------------------------------------------------------------------
    def _find_buffer_slots(self) -> list[tuple[dict[str, Any], str, Tensor]]:
        """(owning module's ``_buffers`` dict, name, tensor) of every selected buffer. ``module.to()``,
        ``.double()`` and friends replace buffers by writing that dict directly, which fires no
        registration hook: comparing the slots catches it (a few microseconds per update)."""
        return self._slots("_buffers", {id(s.tensor) for s in self._selected if s.is_buffer})

    def _find_param_probes(self) -> list[tuple[dict[str, Any], str, Tensor]]:
        """(owning module's ``_parameters`` dict, name, tensor) of up to three averaged parameters (first,
        middle, last). Wrappers that shard or flatten a model after the EMA was built (FSDP2's
        ``fully_shard``, FSDP, DeepSpeed ZeRO-3) swap every parameter by writing that dict directly,
        which fires no registration hook; the EMA would then average the old, frozen tensors. Three
        dictionary lookups per update catch such a wholesale swap; a single parameter replaced that way
        (not through ``setattr``/``register_parameter``) can go unseen."""
        wanted = {id(s.tensor) for s in self._selected if not s.is_buffer and s.mode == "average"}
        slots = self._slots("_parameters", wanted)
        return slots if len(slots) <= 3 else [slots[0], slots[len(slots) // 2], slots[-1]]

    def _slots(self, registry: str, wanted: set[int]) -> list[tuple[dict[str, Any], str, Tensor]]:
        """(module's ``registry`` dict, name, tensor) of every tensor in ``wanted`` (ids), model order."""
        slots: list[tuple[dict[str, Any], str, Tensor]] = []
        for module in self.model.modules():
            table: dict[str, Any] = getattr(module, registry)
            slots.extend((table, name, t) for name, t in table.items() if t is not None and id(t) in wanted)
        return slots

    def _check_model_unchanged(self) -> None:
        if (
            self._generation != _generation
            or any(d.get(n) is not t for d, n, t in self._buffer_slots)
            or any(d.get(n) is not t for d, n, t in self._param_probes)
        ):
            self._verify_model(strict_identity=True)
            self._buffer_slots = self._find_buffer_slots()
            self._param_probes = self._find_param_probes()
            self._generation = _generation

    def _verify_model(self, *, strict_identity: bool) -> None:
        """Raise a clear error if the model's tensors no longer match the shadows; rebind buffers that
        were re-assigned with the same shape (a module replacing ``self.buf = ...``)."""
        now = {s.key: s for s in select(self.model, include=None, exclude=None, buffers="copy")}
        before = {s.key: s for s in self._selected}
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
                if not old.is_buffer and strict_identity and old.mode == "average":
                    raise ValueError(
                        f"the model changed after the EMA was built: parameter {key!r} was replaced by a new "
                        "tensor (wrapping the model in FSDP2's fully_shard, FSDP or DeepSpeed ZeRO-3 does this); "
                        "build the EMA after the model is final, or copy new weights in place "
                        "(param.copy_(...)) instead of re-assigning"
                    )
                rebound[key] = new
        if rebound:
            self._selected = [
                Selected(s.key, s.model_keys, rebound.get(s.key, s.tensor), s.is_buffer, s.mode, s.shape)
                for s in self._selected
            ]
            for group in self._groups:
                group.sources = [rebound.get(k, src) for k, src in zip(group.keys, group.sources)]
                self._plan(group)
