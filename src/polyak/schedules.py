"""Decay schedules: pure functions of the averaging step.

A schedule maps ``t`` (the 1-based index of the current averaging update, counted from ``start_step``)
to the decay ``beta_t`` in ``[0, 1]`` used by ``shadow <- beta_t * shadow + (1 - beta_t) * weight``.
Schedules are small frozen dataclasses: callable, comparable, printable, and picklable, so a schedule
can be written into a checkpoint's config and tested without any model.

| schedule | beta_t | matches |
|---|---|---|
| ``constant(d)`` | d | timm ModelEmaV2/V3 (no warm-up), torch_ema ``use_num_updates=False`` |
| ``ultralytics(d, tau)`` | d * (1 - exp(-t / tau)) | Ultralytics/YOLOv5-v8 ``ModelEMA`` |
| ``num_updates(d)`` | min(d, (1 + t) / (10 + t)) | TF/Paddle ``ExponentialMovingAverage``, torch_ema (default), diffusers without warm-up |
| ``inverse_gamma(d, inv_gamma, power, min_decay)`` | clamp(1 - (1 + t/inv_gamma)^-power) | timm V3 warm-up, ema-pytorch, diffusers |
| ``half_life(h)`` | 0.5 ** (1 / h) | the weight of a sample halves every h updates |
| ``power_function(gamma)`` | (1 - 1/t) ** (gamma + 1) | Karras et al. 2024 (EDM2) |
| ``uniform()`` | 1 - 1/t | the running arithmetic mean: SWA / ``AveragedModel`` |

Teacher momentum schedules (self-supervised training; ``polyak.Teacher``), each reproducing its reference
recipe step for step, with ``i = t - 1`` the 0-based iteration of the reference loop:

| schedule | beta_t | matches |
|---|---|---|
| ``dino(N, base)`` | 1 + (base - 1) (1 + cos(pi i / N)) / 2, i < N; then held | DINO ``cosine_scheduler`` (never reaches 1) |
| ``dinov2(N, base)`` | same as ``dino``; 1.0 from i = N on | DINOv2 ``CosineScheduler`` |
| ``lightly_cosine(N, start, end)`` | end - (end - start) (cos(pi s / (N - 1)) + 1) / 2; end from s = N - 1 | lightly ``cosine_schedule`` |
| ``moco_v3(E, ipe, base)`` | 1 - (1 + cos(pi e / E)) (1 - base) / 2, e = i // ipe + (i % ipe) / ipe | MoCo v3 ``adjust_moco_momentum`` |
| ``ijepa(ipe, E, start, end, ipe_scale)`` | start + i (end - start) / (ipe E ipe_scale) | I-JEPA ``momentum_scheduler`` |
| ``mean_teacher(alpha)`` | min(1 - 1 / (t + 1), alpha) | Tarvainen & Valpola 2017 ``update_ema_variables`` |

Every built-in schedule also has a tensor form, ``schedule.at_tensor(t)``: the same formula in torch ops on
an integer tensor of steps, computed on ``t``'s device in float64 (float32 where the device has no float64,
e.g. MPS), with no host read, so ``EMA(capturable=True)`` can compute the decay inside a CUDA graph or a
``torch.compile`` graph. On CPU, for a 0-dim ``t``, it equals ``schedule(int(t))`` bit for bit, except
``ultralytics``: ``torch.exp`` (SLEEF) and Python's ``math.exp`` (libm) differ in the last bit of float64
for about one step in a thousand (the decays then differ by at most one ulp of 1.0, 2.2e-16). ``pow`` is
called with a tensor exponent, which runs libm's ``pow`` like Python does (a Python-number exponent would
take torch's shortcuts for -2, -1, 0.5, 2, 3, which round differently). On CUDA, ``exp`` and ``pow`` come
from CUDA's math library and may differ from libm in the last bit too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from polyak._validate import as_float, as_int

__all__ = [
    "DEFAULT_DECAY",
    "Schedule",
    "TensorSchedule",
    "as_schedule",
    "constant",
    "dino",
    "dinov2",
    "half_life",
    "ijepa",
    "inverse_gamma",
    "lightly_cosine",
    "mean_teacher",
    "moco_v3",
    "num_updates",
    "power_function",
    "ultralytics",
    "uniform",
]


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``schedule(t) -> decay`` with ``t >= 1``."""

    def __call__(self, t: int, /) -> float: ...


@runtime_checkable
class TensorSchedule(Schedule, Protocol):
    """A schedule that ``EMA(capturable=True)`` can use: it also computes ``beta_t`` from a tensor of
    steps with torch ops only (no ``.item()``, no Python branch on the value), elementwise, on ``t``'s
    device, returning a floating tensor shaped like ``t``. Values at ``t < 1`` are unspecified."""

    def at_tensor(self, t: Tensor, /) -> Tensor: ...


def _float_steps(t: Tensor) -> Tensor:
    """The steps as floats: float64, or float32 on devices without float64 (MPS)."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _full(like: Tensor, value: float) -> Tensor:
    """``value`` as a tensor on ``like``'s device. Dividing by (or raising to) a device tensor instead of
    a Python number keeps the IEEE operation: CUDA turns ``x / number`` into ``x * (1 / number)`` and
    ``pow(x, number)`` has shortcuts for a few exponents, either of which can change the last bit."""
    return torch.full_like(like, value)


def _check_decay(value: float, what: str) -> float:
    """A decay in [0, 1]: 1.0 freezes the average (DINO's teacher momentum schedule ends at 1.0), 0.0
    copies the weights."""
    value = as_float(value, what)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be in [0, 1], got {value!r} (typical values are 0.99 to 0.9999)")
    return value


def _check_positive(value: float, what: str) -> float:
    value = as_float(value, what)  # numpy scalars too; bools and tensors refused
    if not value > 0.0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return value


def _check_step(t: int) -> None:
    if t < 1:
        raise ValueError(f"schedules are defined for t >= 1 (the 1-based averaging step), got t={t}")


def _normalise(
    schedule: object,
    *,
    counts: tuple[str, ...] = (),
    decays: tuple[str, ...] = (),
    positives: tuple[str, ...] = (),
) -> None:
    """Check and normalise a frozen schedule's fields in place, each named in its error: ``counts`` are
    integers >= 1, ``decays`` numbers in [0, 1], ``positives`` positive finite numbers."""
    for name in counts:
        object.__setattr__(schedule, name, as_int(getattr(schedule, name), name, minimum=1))
    for name in decays:
        object.__setattr__(schedule, name, _check_decay(getattr(schedule, name), name))
    for name in positives:
        object.__setattr__(schedule, name, _check_positive(getattr(schedule, name), name))


@dataclass(frozen=True)
class constant:
    """beta_t = decay for every t (timm ModelEmaV2/V3 without warm-up, torch_ema with
    ``use_num_updates=False``)."""

    decay: float

    def __post_init__(self) -> None:
        _normalise(self, decays=("decay",))

    def __call__(self, t: int, /) -> float:
        return self.decay

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = decay, shaped like ``t`` (see the module docstring)."""
        return _full(_float_steps(t), self.decay)


@dataclass(frozen=True)
class ultralytics:
    """beta_t = decay * (1 - exp(-t / tau)): Ultralytics/YOLOv5-v8 ``ModelEMA``.

    The ramp reaches ~63% of ``decay`` after ``tau`` updates and ~99% after ``5 * tau``; on a run much
    shorter than ``tau`` the average follows the raw weights closely (a trap shown in ``polyak
    experiment sweep``).
    """

    decay: float = 0.9999
    tau: float = 2000.0

    def __post_init__(self) -> None:
        _normalise(self, decays=("decay",), positives=("tau",))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return self.decay * (1.0 - math.exp(-t / self.tau))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = decay * (1 - exp(-t / tau)) (see the module docstring: exp may differ from ``math.exp``
        in the last bit)."""
        x = _float_steps(t)
        return (1.0 - torch.exp(torch.div(torch.neg(x), _full(x, self.tau)))) * self.decay


@dataclass(frozen=True)
class num_updates:
    """beta_t = min(decay, (1 + t) / (10 + t)): TensorFlow/Paddle ``ExponentialMovingAverage(num_updates)``
    and torch_ema ``use_num_updates=True``.

    Note: (1 + t) / (10 + t) reaches 0.999 only at t = 8991 and 0.9999 at t = 89991, so on a short run
    the effective decay is far below ``decay``.
    """

    decay: float = 0.9999

    def __post_init__(self) -> None:
        _normalise(self, decays=("decay",))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = min(decay, (1 + t) / (10 + t)) (see the module docstring)."""
        x = _float_steps(t)
        return torch.clamp_max((1.0 + x) / (10.0 + x), self.decay)


@dataclass(frozen=True)
class inverse_gamma:
    """beta_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, max_decay).

    The warm-up of @crowsonkb used by timm ``ModelEmaV3(use_warmup=True)``, lucidrains' ema-pytorch and
    diffusers ``EMAModel(use_ema_warmup=True)``. Those libraries copy the weights for their first
    ``update_after_step + 1`` updates; ``EMA(start_step=update_after_step + 1)`` reproduces them exactly.
    power=2/3 reaches 0.999 at 31.6K steps and 0.9999 at 1M; power=3/4 reaches 0.999 at 10K steps.
    """

    max_decay: float = 0.9999
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        _normalise(self, decays=("max_decay", "min_decay"), positives=("inv_gamma", "power"))
        if self.min_decay > self.max_decay:
            raise ValueError(f"min_decay={self.min_decay} must not exceed max_decay={self.max_decay}")

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        value = 1.0 - float((1.0 + t / self.inv_gamma) ** -self.power)
        return max(self.min_decay, min(value, self.max_decay))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, max_decay) (see the module
        docstring)."""
        x = _float_steps(t)
        base = 1.0 + torch.div(x, _full(x, self.inv_gamma))
        value = 1.0 - torch.pow(base, _full(base, -self.power))
        return torch.clamp(value, min=self.min_decay, max=self.max_decay)


@dataclass(frozen=True)
class half_life:
    """beta_t = 0.5 ** (1 / steps): the weight of any sample in the average halves every ``steps``
    updates (the "half-life" parameterisation of pandas ``ewm(halflife=...)`` and EDM2's sigma_rel
    discussion)."""

    steps: float

    def __post_init__(self) -> None:
        _normalise(self, positives=("steps",))

    def __call__(self, t: int, /) -> float:
        return float(0.5 ** (1.0 / self.steps))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = 0.5 ** (1 / steps), shaped like ``t`` (see the module docstring)."""
        return _full(_float_steps(t), self(1))


@dataclass(frozen=True)
class power_function:
    """beta_t = (1 - 1 / t) ** (gamma + 1): the power-function EMA of Karras et al. 2024, "Analyzing and
    Improving the Training Dynamics of Diffusion Models" (EDM2), eq. 3.

    The averaging profile is a power function of training time, so the average's relative width stays
    constant as training goes on; gamma=0 is the uniform average (SWA). Requires gamma > -1.
    """

    gamma: float

    def __post_init__(self) -> None:
        gamma = as_float(self.gamma, "gamma")  # numpy scalars too, like every other schedule argument
        if not gamma > -1.0:
            raise ValueError(f"gamma must be a finite number > -1, got {gamma!r}")
        object.__setattr__(self, "gamma", gamma)

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return float((1.0 - 1.0 / t) ** (self.gamma + 1.0))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = (1 - 1 / t) ** (gamma + 1) (see the module docstring)."""
        base = 1.0 - torch.reciprocal(_float_steps(t))
        return torch.pow(base, _full(base, self.gamma + 1.0))


@dataclass(frozen=True)
class uniform:
    """beta_t = 1 - 1 / t: the running arithmetic mean of every averaged weight, i.e. SWA /
    ``torch.optim.swa_utils.AveragedModel`` (whose first ``update_parameters`` copies, then
    ``avg += (w - avg) / (n + 1)``)."""

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return 1.0 - 1.0 / t

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """beta_t = 1 - 1 / t (see the module docstring)."""
        return 1.0 - torch.reciprocal(_float_steps(t))


def _cosine_to(final: float, base: float, i: Tensor | float, n: float) -> Tensor | float:
    """``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` in the reference's order of operations."""
    if isinstance(i, Tensor):
        return final + 0.5 * (base - final) * (1.0 + torch.cos(torch.div(math.pi * i, _full(i, n))))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


@dataclass(frozen=True)
class dino:
    """DINO's teacher momentum (Caron et al. 2021; ``utils.cosine_scheduler(momentum_teacher, 1, epochs,
    len(data_loader))`` in facebookresearch/dino)::

        beta_t = final + 0.5 * (base - final) * (1 + cos(pi * i / total_steps)),   i = t - 1

    for the ``total_steps = epochs * iterations_per_epoch`` iterations of the run; the last value (just
    below ``final``) is held after that. The schedule never reaches ``final`` inside the run."""

    total_steps: int
    base: float = 0.996
    final: float = 1.0

    def __post_init__(self) -> None:
        _normalise(self, counts=("total_steps",), decays=("base", "final"))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return float(_cosine_to(self.final, self.base, float(min(t - 1, self.total_steps - 1)), self.total_steps))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        i = torch.clamp(_float_steps(t) - 1.0, max=self.total_steps - 1)
        return torch.as_tensor(_cosine_to(self.final, self.base, i, self.total_steps))


@dataclass(frozen=True)
class dinov2:
    """DINOv2's teacher momentum (Oquab et al. 2023; ``CosineScheduler(momentum_teacher,
    final_momentum_teacher, epochs * OFFICIAL_EPOCH_LENGTH)`` in facebookresearch/dinov2)::

        beta_t = final + 0.5 * (base - final) * (1 + cos(pi * i / total_steps))   for i = t - 1 < total_steps
        beta_t = final                                                             afterwards

    Unlike ``dino`` it reaches ``final`` (1.0 by default: the teacher is then frozen)."""

    total_steps: int
    base: float = 0.992
    final: float = 1.0

    def __post_init__(self) -> None:
        _normalise(self, counts=("total_steps",), decays=("base", "final"))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        if t - 1 >= self.total_steps:
            return self.final
        return float(_cosine_to(self.final, self.base, float(t - 1), self.total_steps))

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        i = _float_steps(t) - 1.0
        value = torch.as_tensor(
            _cosine_to(self.final, self.base, torch.clamp(i, max=self.total_steps), self.total_steps)
        )
        return torch.where(i >= self.total_steps, _full(value, self.final), value)


@dataclass(frozen=True)
class lightly_cosine:
    """lightly's ``cosine_schedule(step, max_steps, start_value, end_value)`` (lightly.models.utils),
    with ``step = (t - 1) // steps_per_epoch`` (``steps_per_epoch > 1`` for the common per-epoch use,
    ``cosine_schedule(current_epoch, max_epochs, 0.996, 1)``)::

        beta_t = end - (end - start) * (cos(pi * step / (max_steps - 1)) + 1) / 2   for step < max_steps
        beta_t = end                                                              for step >= max_steps
                                                                                  or max_steps == 1

    lightly's own endpoint convention: ``end`` is reached at ``step = max_steps - 1``, inside the run."""

    max_steps: int
    start: float = 0.996
    end: float = 1.0
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        _normalise(self, counts=("max_steps", "steps_per_epoch"), decays=("start", "end"))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        step = (t - 1) // self.steps_per_epoch
        if self.max_steps == 1 or step >= self.max_steps:
            return self.end
        return float(self.end - (self.end - self.start) * (math.cos(math.pi * step / (self.max_steps - 1)) + 1) / 2)

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        step = torch.div(_float_steps(t) - 1.0, self.steps_per_epoch, rounding_mode="floor")
        if self.max_steps == 1:
            return _full(step, self.end)
        x = torch.div(math.pi * torch.clamp(step, max=self.max_steps - 1), _full(step, self.max_steps - 1))
        value = self.end - (self.end - self.start) * (torch.cos(x) + 1) / 2
        return torch.where(step >= self.max_steps, _full(value, self.end), value)


@dataclass(frozen=True)
class moco_v3:
    """MoCo v3's momentum (Chen, Xie & He 2021; ``adjust_moco_momentum(epoch + i / iters_per_epoch)`` in
    facebookresearch/moco-v3), over fractional epochs::

        beta_t = 1 - 0.5 * (1 + cos(pi * e / epochs)) * (1 - base),
        e = i // steps_per_epoch + (i % steps_per_epoch) / steps_per_epoch,   i = t - 1

    held at 1.0 from ``e = epochs`` on. MoCo v3 updates the momentum encoder before its forward pass, so
    call ``teacher.update()`` before the teacher's forward, once per iteration."""

    epochs: int
    steps_per_epoch: int
    base: float = 0.99

    def __post_init__(self) -> None:
        _normalise(self, counts=("epochs", "steps_per_epoch"), decays=("base",))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        epoch, it = divmod(t - 1, self.steps_per_epoch)
        e = min(epoch + it / self.steps_per_epoch, float(self.epochs))
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * e / self.epochs)) * (1.0 - self.base)

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        i = _float_steps(t) - 1.0
        ipe = _full(i, self.steps_per_epoch)
        e = torch.div(i, ipe, rounding_mode="floor") + torch.div(torch.remainder(i, ipe), ipe)
        e = torch.clamp(e, max=self.epochs)
        return 1.0 - 0.5 * (1.0 + torch.cos(torch.div(math.pi * e, _full(e, self.epochs)))) * (1.0 - self.base)


@dataclass(frozen=True)
class ijepa:
    """I-JEPA's linear momentum ramp (Assran et al. 2023; ``momentum_scheduler`` in
    facebookresearch/ijepa ``train.py``)::

        beta_t = start + i * (end - start) / (steps_per_epoch * epochs * ipe_scale),   i = t - 1

    for ``i <= int(steps_per_epoch * epochs * ipe_scale)`` (the generator's length), held after that.
    With ``ipe_scale > 1`` (the reference default is 1.0) the ramp reaches ``end`` only after the run, so the
    run ends short of it.
    Being a function of ``t``, it resumes without the reference's replay of ``next()`` calls."""

    steps_per_epoch: int
    epochs: int
    start: float = 0.996
    end: float = 1.0
    ipe_scale: float = 1.0

    def __post_init__(self) -> None:
        _normalise(self, counts=("steps_per_epoch", "epochs"), decays=("start", "end"), positives=("ipe_scale",))

    @property
    def _span(self) -> float:
        return self.steps_per_epoch * self.epochs * self.ipe_scale

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        i = min(t - 1, int(self._span))
        value = self.start + i * (self.end - self.start) / self._span
        return min(value, 1.0)

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        i = torch.clamp(_float_steps(t) - 1.0, max=int(self._span))
        value = self.start + torch.div(i * (self.end - self.start), _full(i, self._span))
        return torch.clamp(value, max=1.0)


@dataclass(frozen=True)
class mean_teacher:
    """Mean teacher (Tarvainen & Valpola 2017; ``update_ema_variables`` in CuriousAI/mean-teacher, called
    after the ``global_step``-th optimizer step)::

        beta_t = min(1 - 1 / (t + 1), alpha)

    so the teacher is the plain running mean of the student until ``1 - 1/(t+1)`` reaches ``alpha``. The
    reference builds its teacher as a separate random model, whose weight in the average is 1/(t+1) during
    that warm-up; ``polyak.Teacher`` starts from a copy of the student instead."""

    alpha: float = 0.999

    def __post_init__(self) -> None:
        _normalise(self, decays=("alpha",))

    def __call__(self, t: int, /) -> float:
        _check_step(t)
        return min(1.0 - 1.0 / (t + 1), self.alpha)

    def at_tensor(self, t: Tensor, /) -> Tensor:
        """The tensor form of ``__call__`` (see the module docstring)."""
        return torch.clamp_max(1.0 - torch.reciprocal(_float_steps(t) + 1.0), self.alpha)


DEFAULT_DECAY = power_function(16.9722)
"""The decay of ``EMA(model)`` and the callbacks when none is given: the power-function EMA whose profile
has relative width sigma_rel = 0.05 (EDM2; gamma from ``sigma_rel^2 = (g+1) / ((g+2)^2 (g+3))``). Its
window grows with the run, so it neither keeps the initial weights on a short run (as constant 0.9999
does) nor follows the raw weights closely on a long one. Chosen by ``polyak experiment defaults``: never
significantly worse than the raw weights, and the most wins against them (docs/experiments.md)."""


def as_schedule(decay: float | Callable[[int], float]) -> Callable[[int], float]:
    """A float becomes ``constant(decay)``; a callable is returned as it is (its values are checked
    when they are used)."""
    if callable(decay):
        return decay
    return constant(decay)
