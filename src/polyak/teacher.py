"""``Teacher``: an EMA of a student network, as a module (BYOL, DINO/DINOv2, MoCo v3, I-JEPA, mean teacher).

The teacher's weights follow ``theta_teacher <- m_t * theta_teacher + (1 - m_t) * theta_student`` once per
optimizer step, with ``m_t`` a momentum or a schedule from ``polyak.schedules`` (``dino``, ``dinov2``,
``lightly_cosine``, ``moco_v3``, ``ijepa``, ``mean_teacher``). It is ``polyak.EMA`` underneath: tensors
are paired with the student's by name, and the teacher's parameters are the EMA's shadows (one copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polyak import _state, hooks
from polyak._module import averaged_module
from polyak._select import BufferPolicy, Pattern, normalize_key
from polyak.ema import EMA, DecayLike, NonFinitePolicy

__all__ = ["Teacher"]

TeacherBuffers = Literal["own", "average", "copy"]
TeacherMode = Literal["eval", "train"]
SkippedSteps = Literal["update", "skip"]
TEACHER_BUFFERS: tuple[str, ...] = ("own", "average", "copy")
TEACHER_MODES: tuple[str, ...] = ("eval", "train")
SKIPPED_STEPS: tuple[str, ...] = ("update", "skip")
_EMA_BUFFERS: dict[str, BufferPolicy] = {"own": "skip", "average": "average", "copy": "skip"}


class Teacher(nn.Module):
    """A momentum teacher: the student's architecture, weights an EMA of the student's, forward under
    ``no_grad``.

    ``teacher.update()`` after each optimizer step (or ``teacher.attach(optimizer)``) applies::

        theta_teacher <- m_t * theta_teacher + (1 - m_t) * theta_student     (theta.lerp_(student, 1 - m_t))

    starting from a copy of the student. ``m_t`` is ``momentum`` (a float in [0, 1]; 1.0 freezes the
    teacher) or a schedule of the update count ``t`` (``polyak.schedules.dino(total_steps)`` ...).

    Args:
        student: the network being trained (plain, DDP-wrapped or compiled: ``module.`` and ``_orig_mod.``
            prefixes are stripped, so tensors pair by name). Never modified.
        momentum: the decay ``m_t``: a float, or a schedule ``t -> m_t``.
        include, exclude: which of the student's tensors the teacher averages (names, globs, module
            prefixes, regexes, as in ``polyak.EMA``). Parameters left out are the student's own tensors
            (shared, not averaged): e.g. ``exclude="predictor"`` for a BYOL online network.
        buffers: the teacher's buffers (BatchNorm statistics): ``"own"`` (default; copied from the student
            once, then changed only by the teacher's own train-mode forwards, as in DINO), ``"average"``
            (float buffers averaged like the weights, integer ones copied at each update, as timm's
            ``ModelEmaV2``), or ``"copy"`` (copied from the student at each update). The teacher's buffers
            are always its own tensors: a teacher forward never changes the student.
        mode: ``"eval"`` (default) or ``"train"``: the mode the teacher's module runs in, whatever
            ``train()``/``eval()`` is called on a parent (BatchNorm uses batch statistics in ``"train"``).
        skipped_steps: for ``attach(optimizer, scaler=...)``: ``"update"`` (default, as DINO, MoCo v3 and
            I-JEPA do: the teacher is updated on every iteration, also when ``GradScaler`` skipped the
            optimizer step) or ``"skip"`` (only after steps that ran).
        nonfinite: as ``polyak.EMA``: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` a NaN/inf student.

    The teacher has no ``nn.Parameter`` (``teacher.parameters()`` is empty, and so is a parent's share of
    it), so no optimizer can be given its weights; its ``state_dict()`` holds the averages, its own
    buffers and the counters, and ``load_state_dict`` restores them bit for bit. ``teacher.module`` is
    the averaged network itself (e.g. ``teacher.module.backbone(x)``; call it under ``torch.no_grad()``).
    """

    def __init__(
        self,
        student: nn.Module,
        momentum: DecayLike = 0.996,
        *,
        include: Pattern | Iterable[Pattern] | None = None,
        exclude: Pattern | Iterable[Pattern] | None = None,
        buffers: TeacherBuffers = "own",
        mode: TeacherMode = "eval",
        skipped_steps: SkippedSteps = "update",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        if buffers not in TEACHER_BUFFERS:
            raise ValueError(f"buffers must be one of {TEACHER_BUFFERS}, got {buffers!r}")
        if mode not in TEACHER_MODES:
            raise ValueError(f"mode must be one of {TEACHER_MODES}, got {mode!r}")
        if skipped_steps not in SKIPPED_STEPS:
            raise ValueError(f"skipped_steps must be one of {SKIPPED_STEPS}, got {skipped_steps!r}")
        if isinstance(momentum, (list, tuple)):
            raise TypeError("a Teacher keeps one average: pass one momentum (a float or a schedule), not a list")
        super().__init__()
        ema = EMA(
            student,
            decay=momentum,
            include=include,
            exclude=exclude,
            buffers=_EMA_BUFFERS[buffers],
            nonfinite=nonfinite,
        )
        if ema._shards is not None:
            raise ValueError(
                "a Teacher is a module over its averages, but this student's parameters are DTensors (FSDP2's "
                "fully_shard, tensor parallelism): each rank holds only its shards. Use polyak.EMA(student) and "
                "`with ema.apply():` for the teacher's forward (the sharded model gathers the averaged weights), "
                "or wrap the student in DDP"
            )
        module = averaged_module(student, ema._shadow_views(0), ema._selected, own_buffers=True)
        module.train(mode == "train")
        # Plain attributes, not submodules: no teacher tensor shows up in parameters(), and a parent's
        # .to()/.half() cannot re-point them away from the shadows.
        self.__dict__["_ema"] = ema
        self.__dict__["_module"] = module
        self.buffers_policy: TeacherBuffers = buffers
        self.mode: TeacherMode = mode
        self.skipped_steps: SkippedSteps = skipped_steps
        mine = {normalize_key(k): v for k, v in module.state_dict(keep_vars=True).items()}
        # the teacher's own buffers (every buffer without an average), and those refreshed at each update
        self._own: dict[str, Tensor] = {
            s.key: mine[s.key] for s in ema._selected if s.is_buffer and s.mode != "average"
        }
        refreshed = [s for s in ema._selected if s.is_buffer and s.mode != "average" and buffers != "own"]
        self._refresh: list[tuple[Tensor, Tensor]] = [(mine[s.key], s.tensor) for s in refreshed]
        self._stepped = False
        self._scaler: Any = None

    # --- reading ----------------------------------------------------------------------------------------
    @property
    def ema(self) -> EMA:
        """The ``polyak.EMA`` that holds the averages and the counters."""
        ema: EMA = self.__dict__["_ema"]
        return ema

    @property
    def module(self) -> nn.Module:
        """The averaged network (frozen; its parameters are the EMA's shadows)."""
        module: nn.Module = self.__dict__["_module"]
        return module

    @property
    def momentum(self) -> float:
        """The momentum of the last update (0.0 before the first)."""
        return self.ema.last_decays[0]

    @property
    def step(self) -> int:
        """Updates so far."""
        return self.ema.step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged network's forward, under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"momentum={self.ema.schedules[0]!r}, step={self.step}, buffers={self.buffers_policy!r}, "
            f"mode={self.mode!r}, averaged={len(self.ema.averaged_keys)} tensors"
        )

    # --- updating ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """Fold the student's current weights into the teacher (once per optimizer step)."""
        self.ema.update()
        for dst, src in self._refresh:
            dst.copy_(src)

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> hooks.StepHook[Teacher]:
        """Call ``update()`` after every ``optimizer.step()``: with gradient accumulation over k micro-batches
        that is one update per k batches. With ``scaler`` (a ``torch.amp.GradScaler``) and
        ``skipped_steps="update"``, ``scaler.step(optimizer)`` updates the teacher also when it skipped the
        optimizer step. Returns the hook handle; ``detach()`` removes everything."""
        hook = hooks.register(self, optimizer, self._after_step)
        if scaler is not None and self.skipped_steps == "update":
            if not callable(getattr(scaler, "step", None)):
                raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
            original = scaler.step

            def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
                self._stepped = False
                out = original(opt, *args, **kwargs)
                if opt is optimizer and not self._stepped and hooks.attached(self) is hook:
                    self.update()  # the scaler skipped optimizer.step(): the reference recipes update anyway
                return out

            scaler.step = step
            self._scaler = scaler
        return hook

    def _after_step(self) -> None:
        self._stepped = True
        self.update()

    def detach(self) -> None:
        """Undo ``attach`` (a no-op when not attached)."""
        hooks.unregister(self)
        if self._scaler is not None:
            del self._scaler.step  # the instance attribute set by attach: back to GradScaler.step
            self._scaler = None

    # --- checkpoints ------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        ema = self.ema
        state = ema.state_dict()
        for key, value in state["averages"][0].items():
            destination[f"{prefix}average.{key}"] = value
        for key, buf in self._own.items():
            destination[f"{prefix}buffer.{key}"] = buf if keep_vars else buf.detach().clone()
        counters = [state["step"], state["skipped_updates"], state["products"][0], state["last_decays"][0]]
        destination[f"{prefix}counters"] = torch.tensor(counters, dtype=torch.float64)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        averages: dict[str, Tensor] = {}
        own: dict[str, Tensor] = {}
        counters: Tensor | None = None
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name.startswith("average."):
                averages[name[len("average.") :]] = value
            elif name.startswith("buffer."):
                own[name[len("buffer.") :]] = value
            elif name == "counters":
                counters = value
            else:
                unexpected_keys.append(key)
        missing = [f"{prefix}buffer.{k}" for k in self._own if k not in own]
        missing += [f"{prefix}average.{k}" for k in self.ema.averaged_keys if k not in averages]
        if counters is None or missing:
            missing_keys.extend(missing + ([f"{prefix}counters"] if counters is None else []))
            return
        if not isinstance(counters, Tensor) or counters.shape != (4,):
            error_msgs.append(f"{prefix}counters must be a tensor of 4 numbers, got {counters!r}")
            return
        for key, buf in self._own.items():
            if not isinstance(own[key], Tensor) or own[key].shape != buf.shape:
                got = getattr(own[key], "shape", type(own[key]).__name__)
                error_msgs.append(
                    f"shape mismatch for {prefix}buffer.{key}: checkpoint {got}, teacher {tuple(buf.shape)}"
                )
        if error_msgs:
            return
        step, skipped, product, last = counters.tolist()
        if step != int(step) or skipped != int(skipped):
            error_msgs.append(f"{prefix}counters hold a non-integer step or count: {counters.tolist()}")
            return
        ema = self.ema
        state = _state.build(
            step=int(step),
            skipped_updates=int(skipped),
            products=[product],
            last_decays=[last],
            config=_state.config_of(ema),
            averages=[averages],
        )
        try:
            ema.load_state_dict(state)  # validates everything before writing
        except ValueError as err:
            error_msgs.append(str(err))
            return
        with torch.no_grad():
            for key, buf in self._own.items():
                buf.copy_(own[key])
