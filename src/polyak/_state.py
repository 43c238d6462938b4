"""The EMA state format: the one place that builds it, checks it, and reads the averages out of it.

A state (``EMA.state_dict()``, the ``ema`` section of a checkpoint, a converted peer checkpoint) is a
plain dict that ``torch.load(weights_only=True)`` and safetensors' JSON skeleton both hold::

    {"format": "polyak.ema", "version": 1,
     "step": int >= 0,                      # calls of update()
     "skipped_updates": int >= 0,           # updates refused by nonfinite="skip"
     "products": [float in [0, 1]] * K,     # prod(beta) over the averaging updates of each average
     "last_decays": [float in [0, 1]] * K,  # the decay of each average at its last update
     "config": {"decay": [...], "start_step": ..., "debias": bool, ...},   # informative, except debias
     "averages": [{normalised key: shadow tensor}] * K}

``parse`` turns any mapping into a typed :class:`EMAState` or raises a ValueError naming the key, before
anyone writes anything; ``plan_load`` matches it against the shadows it will overwrite. The averaged
value of a shadow is ``shadow`` or, with ``debias=True``, ``shadow / (1 - product)`` (Adam's bias
correction, Kingma & Ba 2015, Alg. 1): before the first averaging update the product is 1, the zero
shadow carries no information, and the average is the live weight (``debiased``). Writers of files
(``polyak.io``), the CLI and ``EMA`` all go through these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from polyak._kernels import finite_on_host
from polyak._select import normalize_key
from polyak._validate import as_bool, as_float, as_int

log = logging.getLogger("polyak")

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "EMAState",
    "Settings",
    "build",
    "check_index",
    "config_changes",
    "config_of",
    "debiased",
    "model_state_with",
    "parse",
    "plan_load",
]

STATE_FORMAT = "polyak.ema"
STATE_VERSION = 1
_COMPARED_SETTINGS = ("decay", "start_step", "update_every")


class Settings(Protocol):
    """What ``config_of`` reads from an EMA (``polyak.EMA`` has these attributes)."""

    @property
    def schedules(self) -> Sequence[object]: ...
    @property
    def start_step(self) -> int: ...
    @property
    def update_every(self) -> int: ...
    @property
    def buffers(self) -> str: ...
    @property
    def debias(self) -> bool: ...
    @property
    def dtype(self) -> torch.dtype | None: ...
    @property
    def nonfinite(self) -> str: ...


@dataclass(frozen=True)
class EMAState:
    """A checked state: counters in range, every average a ``{normalised key: finite dense tensor}``."""

    step: int
    skipped_updates: int
    products: tuple[float, ...]
    last_decays: tuple[float, ...]
    averages: tuple[dict[str, Tensor], ...]
    config: dict[str, Any]
    debias: bool | None  # None when the state does not record it

    @property
    def num_averages(self) -> int:
        return len(self.averages)


def config_of(ema: Settings) -> dict[str, Any]:
    """The ``config`` entry of a state: the settings, for people and for ``config_changes``."""
    return {
        "decay": [repr(s) for s in ema.schedules],
        "start_step": ema.start_step,
        "update_every": ema.update_every,
        "buffers": ema.buffers,
        "debias": ema.debias,
        "dtype": None if ema.dtype is None else str(ema.dtype),
        "nonfinite": ema.nonfinite,
    }


def build(
    *,
    step: int,
    skipped_updates: int,
    products: Sequence[float],
    last_decays: Sequence[float],
    config: Mapping[str, Any],
    averages: Sequence[Mapping[str, Tensor]],
) -> dict[str, Any]:
    """The state dict (see the module docstring); tensors are stored as given (callers pass copies)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": int(step),
        "skipped_updates": int(skipped_updates),
        "products": [float(p) for p in products],
        "last_decays": [float(d) for d in last_decays],
        "config": dict(config),
        "averages": [dict(a) for a in averages],
    }


def _corrupt(what: str, detail: str) -> ValueError:
    return ValueError(f"corrupt {what}: {detail}")


def _counter(state: Mapping[str, Any], key: str, default: int, what: str) -> int:
    value = state.get(key, default)
    try:
        return as_int(value, repr(key), minimum=0)
    except (TypeError, ValueError):
        raise _corrupt(what, f"{key!r} must be a non-negative int (a count of updates), got {value!r}") from None


def _fractions(state: Mapping[str, Any], key: str, default: float, count: int, what: str) -> tuple[float, ...]:
    """A list of ``count`` floats in [0, 1]: decay products and decays are nothing else."""
    values = state.get(key, [default] * count)
    if not isinstance(values, (list, tuple)):
        raise _corrupt(what, f"{key!r} must be a list of {count} floats (one per average), got {values!r}")
    if len(values) != count:
        raise _corrupt(what, f"it holds {count} average(s) but {len(values)} {key!r}; one float per average")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(as_float(value, f"{key}[{i}]", minimum=0.0, maximum=1.0))
        except (TypeError, ValueError):
            raise _corrupt(what, f"{key}[{i}] = {value!r}; it must be a number in [0, 1]") from None
    return tuple(out)


def parse(state: object, *, what: str = "EMA state") -> EMAState:
    """Check every field of a state (format, version, counters, tensors) and return it typed.

    Raises ValueError naming the key and what is wrong; reads nothing but ``state``.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"load_state_dict expects a mapping (EMA.state_dict() output), got {type(state).__name__}")
    fmt = state.get("format")
    if fmt != STATE_FORMAT:
        raise ValueError(
            f"not a polyak EMA state dict (format={fmt!r}, expected {STATE_FORMAT!r}); for another library's "
            "checkpoint use polyak.load(path, ema) or polyak.io.from_peer(path, model)"
        )
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise ValueError(f"unsupported polyak EMA state version {version!r} (this polyak reads 1 to {STATE_VERSION})")
    averages = state.get("averages")
    if not isinstance(averages, (list, tuple)) or not averages or not all(isinstance(a, Mapping) for a in averages):
        raise _corrupt(what, "'averages' must be a non-empty list of {key: tensor} mappings")
    count = len(averages)
    checked: list[dict[str, Tensor]] = []
    for k, average in enumerate(averages):
        tensors: dict[str, Tensor] = {}
        for key, value in average.items():
            if not isinstance(key, str):
                raise _corrupt(what, f"average {k} has a key {key!r} that is not a string")
            if not isinstance(value, Tensor):
                raise _corrupt(what, f"{key!r} (average {k}) is a {type(value).__name__}, not a tensor")
            if value.layout != torch.strided:
                raise _corrupt(what, f"{key!r} (average {k}) is a {value.layout} tensor; averages are dense")
            if not (value.is_floating_point() or value.is_complex()):
                raise _corrupt(what, f"{key!r} (average {k}) has dtype {value.dtype}; averages are floating")
            if not finite_on_host([value]):
                raise ValueError(
                    f"EMA state holds NaN/inf in {key!r} (average {k}); refusing to load a corrupt average"
                )
            tensors[normalize_key(key)] = value
        checked.append(tensors)
    config = state.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise _corrupt(what, f"'config' must be a mapping, got {type(config).__name__}")
    debias: bool | None = None
    if "debias" in config:
        try:
            debias = as_bool(config["debias"], "config['debias']")
        except TypeError as exc:
            raise _corrupt(what, str(exc)) from None
    if "step" not in state:
        raise _corrupt(what, "the 'step' entry is missing")
    return EMAState(
        step=_counter(state, "step", 0, what),
        skipped_updates=_counter(state, "skipped_updates", 0, what),
        products=_fractions(state, "products", 1.0, count, what),
        last_decays=_fractions(state, "last_decays", 0.0, count, what),
        averages=tuple(checked),
        config=dict(config),
        debias=debias,
    )


def plan_load(
    state: EMAState,
    shadows: Mapping[str, Sequence[Tensor]],
    *,
    num_averages: int,
    debias: bool,
    what: str = "EMA state",
) -> list[tuple[Tensor, Tensor]]:
    """Match ``state`` against the shadows it will overwrite (``{key: [view of average k]}``) of an EMA
    keeping ``num_averages`` averages and return the ``(shadow, saved)`` copies to make; ValueError
    (nothing written) on any mismatch."""
    count = num_averages
    if state.num_averages != count:
        raise ValueError(
            f"the state holds {state.num_averages} average(s) but this EMA keeps {count}; "
            "build the EMA with the same number of decays"
        )
    if state.debias is not None and state.debias != debias:
        raise ValueError(
            f"the state was saved with debias={state.debias} but this EMA has debias={debias}; "
            "the shadows mean different things, build the EMA with the same debias"
        )
    plan: list[tuple[Tensor, Tensor]] = []
    for k, loaded in enumerate(state.averages):
        missing = sorted(set(shadows) - set(loaded))
        unexpected = sorted(set(loaded) - set(shadows))
        if missing or unexpected:
            raise ValueError(
                f"{what} does not match this model (average {k}): missing keys {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                f"{' ...' if len(unexpected) > 20 else ''}; build the EMA on the same architecture with the "
                "same include/exclude/buffers settings"
            )
        for key, value in loaded.items():
            dst = shadows[key][k]
            if value.shape != dst.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: state has {tuple(value.shape)}, model has {tuple(dst.shape)}"
                )
            if value.dtype != dst.dtype:
                raise ValueError(
                    f"dtype mismatch for {key!r}: state has {value.dtype}, this EMA keeps {dst.dtype}; "
                    f"build the EMA with dtype={value.dtype}"
                )
            plan.append((dst, value))
    return plan


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name old -> new"`` for each schedule setting that differs between a saved and a current config."""
    return [
        f"{name} {saved[name]!r} -> {current[name]!r}"
        for name in _COMPARED_SETTINGS
        if name in saved and name in current and saved[name] != current[name]
    ]


def warn_on_config_change(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Log (once per load) the settings that differ from the saved ones: the EMA keeps its own, as an
    optimizer built with a new learning rate would, but a silent change of decay on resume is a
    common mistake."""
    changed = config_changes(saved, current)
    if changed:
        log.warning(
            "polyak: loading an EMA state saved with other settings (%s); this EMA continues with its own",
            "; ".join(changed),
        )


def check_index(index: object, num_averages: int) -> int:
    """``index`` of one of ``num_averages`` averages (negative counts from the end) as ``0..K-1``."""
    value = as_int(index, "index")
    if not -num_averages <= value < num_averages:
        raise ValueError(f"index {value} out of range: this EMA keeps {num_averages} average(s)")
    return value % num_averages


def debiased(
    shadows: Sequence[Tensor], product: float, *, debias: bool, live: Sequence[Tensor] | None, what: str = "the EMA"
) -> list[Tensor]:
    """The averaged values of ``shadows`` (in their dtype and device).

    Without ``debias`` the shadows themselves. With it, ``shadow / (1 - product)``; when no averaging
    update has happened yet (``product == 1``) the zero shadows carry no information and the average
    is the live weights ``live``, which must then be given (ValueError naming ``what`` otherwise).
    """
    if not debias:
        return list(shadows)
    correction = 1.0 - product
    if correction > 0.0:
        return list(torch._foreach_div(list(shadows), correction))
    if live is None:
        raise ValueError(
            f"{what} uses debias=True and has not been updated yet, so its average is the live weights, "
            "which are not available here (a checkpoint saved without model=); save the model with it, "
            "or use the live model's weights"
        )
    return [w.detach().to(dtype=s.dtype, device=s.device) for s, w in zip(shadows, live, strict=True)]


def model_state_with(
    averaged: Mapping[str, Tensor],
    model_state: Mapping[str, Any],
    *,
    aliases: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """``model_state`` (a ``state_dict()``) with each tensor that has an average replaced by a fresh copy
    of that average in the tensor's own dtype and device; other tensors are copied, other values kept.

    A key's average is ``averaged[aliases.get(key, normalize_key(key))]``: ``aliases`` names the shadow
    of each further name of a tied tensor (an embedding shared with the output head has one average and
    several keys). Keys in ``skip`` are left out.
    """
    aliases = aliases or {}
    out: dict[str, Any] = {}
    for key, value in model_state.items():
        if key in skip:
            continue
        average = averaged.get(aliases.get(key, normalize_key(key)))
        if isinstance(value, Tensor):
            src = value if average is None else average
            out[key] = src.detach().to(dtype=value.dtype, device=value.device, copy=True)
        else:
            out[key] = value
    return out
