"""Other libraries' EMA checkpoints: detect, import into a ``polyak.EMA``, export from one.

Formats (what each library's own ``state_dict()`` / checkpoint holds):

* ``timm``: a training checkpoint ``{"state_dict", "state_dict_ema", "epoch", ...}`` (``train.py``), or
  ``ModelEmaV2/V3.state_dict()`` = the averaged model's keys under ``module.``.
* ``ema_pytorch`` (lucidrains): ``{"initted", "step", "ema_model.<key>", "online_model.<key>"}``.
* ``torch_ema``: ``{"decay", "num_updates", "shadow_params": [...], "collected_params"}``; the list follows
  ``model.parameters()`` order, parameters with ``requires_grad`` only (no buffers).
* ``diffusers`` ``EMAModel``: ``{"decay", "min_decay", "optimization_step", "update_after_step",
  "use_ema_warmup", "inv_gamma", "power", "shadow_params": [...]}``; the list follows the order of the
  parameters given to ``EMAModel`` (``model.parameters()``: all of them, no buffers).
* ``averaged_model`` (``torch.optim.swa_utils.AveragedModel``): ``{"n_averaged", "module.<key>"}``.
* ``ultralytics``: ``{"ema": <pickled nn.Module, fp16>, "updates", "model", ...}``. Reading it unpickles
  the model's classes, which can run arbitrary code: only with ``trust_pickle=True``.
* ``state_dict``: a plain ``{key: tensor}`` of averaged weights.

Importing gives an EMA whose every average equals the peer's averaged weights (keys matched by name
with ``module.``/``_orig_mod.`` stripped; list formats matched by the model's parameter order). The
peer's step counter becomes ``ema.step``. torch_ema and diffusers store their decay rule, which
``schedule_of`` reads back; the other peers keep theirs in code, so pass ``decay=`` to continue with it.

Everything here is pure dict-to-dict: no file is read or written and no ``EMA`` is built
(``polyak.io._exchange`` does that with these functions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _state, schedules
from polyak._select import normalize_key
from polyak._validate import as_bool, as_float, as_int

__all__ = [
    "PEER_FORMATS",
    "averaged_weights",
    "detect",
    "param_names",
    "peer_schedule",
    "peer_state",
    "raw_model_state",
    "schedule_of",
    "to_polyak_state",
]

PEER_FORMATS: tuple[str, ...] = (
    "timm",
    "ema_pytorch",
    "torch_ema",
    "diffusers",
    "averaged_model",
    "ultralytics",
    "state_dict",
)
LIST_FORMATS = ("torch_ema", "diffusers")


def _peer_int(raw: Mapping[str, Any], key: str, kind: str) -> int:
    value = raw[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()  # ema-pytorch and AveragedModel keep their counters as tensors
    try:
        return as_int(value, f"{kind} checkpoint's {key!r}", minimum=0)
    except TypeError as exc:
        raise ValueError(f"corrupt {kind} checkpoint: {exc}") from None


def detect(obj: Any) -> str:
    """Name the format of a loaded checkpoint object (one of ``PEER_FORMATS``); ValueError if unknown."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"not a checkpoint: the file holds a {type(obj).__name__}, expected a dict")
    keys = [str(k) for k in obj]
    if "shadow_params" in obj and "optimization_step" in obj:
        return "diffusers"
    if "shadow_params" in obj:
        return "torch_ema"
    if "state_dict_ema" in obj:
        return "timm"
    if any(k.startswith("ema_model.") for k in keys):
        return "ema_pytorch"
    if "n_averaged" in obj and any(k.startswith("module.") for k in keys):
        return "averaged_model"
    if isinstance(obj.get("ema"), nn.Module) or ("ema" in obj and "updates" in obj):
        return "ultralytics"
    if keys and all(isinstance(v, Tensor) for v in obj.values()):
        return "timm" if all(k.startswith("module.") for k in keys) else "state_dict"
    raise ValueError(
        f"unrecognised checkpoint format: top-level keys {keys[:12]}; supported: polyak, {', '.join(PEER_FORMATS)}"
    )


def param_names(model: nn.Module, kind: str) -> list[str]:
    """The model's parameter names in the order a list format (torch_ema, diffusers) stores them."""
    if kind == "torch_ema":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in model.named_parameters()]


def _tensor_dict(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"corrupt {what}: expected a mapping of tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def averaged_weights(
    raw: Any, kind: str, *, param_names: list[str] | None = None
) -> tuple[dict[str, Tensor], int | None]:
    """The peer's averaged weights ``{model key: tensor}`` and its step counter (None when it keeps none).

    List formats (torch_ema, diffusers) need ``param_names``: the model's parameter names in the order
    the peer was given them.
    """
    if kind not in PEER_FORMATS:
        raise ValueError(f"unknown format {kind!r}; choose one of {PEER_FORMATS}")
    if not isinstance(raw, Mapping):
        raise ValueError(f"corrupt {kind} checkpoint: expected a dict, got {type(raw).__name__}")
    if kind == "timm":
        state = raw.get("state_dict_ema", raw)
        return {normalize_key(k): v for k, v in _tensor_dict(state, "timm EMA state").items()}, None
    if kind == "ema_pytorch":
        weights = {
            k[len("ema_model.") :]: v
            for k, v in _tensor_dict(raw, "ema-pytorch state").items()
            if k.startswith("ema_model.")
        }
        return weights, _peer_int(raw, "step", kind) if "step" in raw else None
    if kind == "averaged_model":
        weights = {
            k[len("module.") :]: v
            for k, v in _tensor_dict(raw, "AveragedModel state").items()
            if k.startswith("module.")
        }
        return weights, _peer_int(raw, "n_averaged", kind)
    if kind == "ultralytics":
        module = raw.get("ema") if raw.get("ema") is not None else raw.get("model")
        if not isinstance(module, nn.Module):
            raise ValueError("Ultralytics checkpoint without an 'ema' or 'model' module")
        step = _peer_int(raw, "updates", kind) if raw.get("updates") is not None else 0
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, step
    if kind == "state_dict":
        return _tensor_dict(raw, "state dict"), None
    shadows = raw.get("shadow_params")
    if not isinstance(shadows, (list, tuple)) or not all(isinstance(t, Tensor) for t in shadows):
        raise ValueError(f"corrupt {kind} state: 'shadow_params' must be a list of tensors")
    if param_names is None:
        raise ValueError(
            f"a {kind} checkpoint stores its averages as an unnamed list in parameter order; it can only be read "
            "with the model (polyak.load(path, ema) or polyak.io.from_peer(path, model))"
        )
    if len(shadows) != len(param_names):
        raise ValueError(
            f"{kind} state holds {len(shadows)} shadow parameters but the model has {len(param_names)} "
            f"{'trainable ' if kind == 'torch_ema' else ''}parameters; pass the model the checkpoint was made from"
        )
    step_key = "num_updates" if kind == "torch_ema" else "optimization_step"
    count = _peer_int(raw, step_key, kind) if raw.get(step_key) is not None else None
    return dict(zip(param_names, shadows)), count


def raw_model_state(raw: Any, kind: str) -> dict[str, Any] | None:
    """The live (non-averaged) weights a peer checkpoint also holds, if any."""
    if not isinstance(raw, Mapping):
        return None
    if kind == "timm" and isinstance(raw.get("state_dict"), Mapping):
        return _tensor_dict(raw["state_dict"], "timm state_dict")
    if kind == "ema_pytorch":
        online = {k[len("online_model.") :]: v for k, v in raw.items() if str(k).startswith("online_model.")}
        return online or None
    if kind == "ultralytics" and isinstance(raw.get("model"), nn.Module):
        return dict(raw["model"].state_dict())
    return None


def schedule_of(raw: Any, kind: str) -> tuple[Callable[[int], float], int] | None:
    """The decay schedule and ``start_step`` a peer checkpoint stores, or None where the peer keeps its
    rule in code (timm, ema-pytorch, Ultralytics, AveragedModel: pass ``decay=`` yourself).

    * torch_ema: ``decay`` and ``num_updates``: None means a constant decay, a count means
      ``min(decay, (1 + n) / (10 + n))`` (torch_ema ``ExponentialMovingAverage.update``) = ``num_updates``.
    * diffusers ``EMAModel.get_decay``: 0 (a copy) until ``optimization_step > update_after_step + 1``,
      then ``clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)`` with ``use_ema_warmup``, else
      ``clamp((1 + t) / (10 + t), min_decay, decay)``, ``t = optimization_step - update_after_step - 1``:
      ``inverse_gamma`` / ``num_updates`` with ``start_step = update_after_step + 1``.
    """
    if kind not in LIST_FORMATS or not isinstance(raw, Mapping) or "decay" not in raw:
        return None
    try:
        decay = as_float(raw["decay"], f"{kind} checkpoint's 'decay'", minimum=0.0, maximum=1.0)
        if kind == "torch_ema":
            rule = schedules.constant(decay) if raw.get("num_updates") is None else schedules.num_updates(decay)
            return rule, 0
        min_decay = as_float(raw.get("min_decay", 0.0), "diffusers checkpoint's 'min_decay'", minimum=0.0, maximum=1.0)
        start = as_int(raw.get("update_after_step", 0), "diffusers checkpoint's 'update_after_step'", minimum=-1) + 1
        if as_bool(raw.get("use_ema_warmup", False), "diffusers checkpoint's 'use_ema_warmup'"):
            inv_gamma = as_float(raw.get("inv_gamma", 1.0), "diffusers checkpoint's 'inv_gamma'", minimum=1e-300)
            power = as_float(raw.get("power", 2 / 3), "diffusers checkpoint's 'power'", minimum=1e-300)
            if 1.0 - (1.0 + 1.0 / inv_gamma) ** -power >= decay >= min_decay:
                return schedules.constant(decay), start  # the warm-up is over at t = 1: a constant decay
            return schedules.inverse_gamma(decay, inv_gamma, power, min(min_decay, decay)), start
    except TypeError as exc:
        raise ValueError(f"corrupt {kind} checkpoint: {exc}") from None
    if min_decay > min(decay, 2 / 11):  # (1 + t) / (10 + t) >= 2/11 from t = 1: a larger floor would act
        raise ValueError(
            f"this diffusers checkpoint's schedule (min_decay={min_decay} without warm-up) has no polyak "
            "equivalent; pass decay= to choose one"
        )
    return schedules.num_updates(decay), start


def peer_schedule(kind: str, schedule: Callable[[int], float], *, start_step: int, update_every: int) -> dict[str, Any]:
    """The fields with which ``kind``'s library continues on ``schedule`` (the inverse of ``schedule_of``).

    A constant decay is written to diffusers as a warm-up that is over at its first step
    (``inv_gamma`` = 1e-30: ``1 - (1 + t * 1e30) ** -1`` is 1.0 in float64, clamped to ``decay``).
    A schedule the peer cannot follow raises ValueError instead of a file that resumes differently.
    """
    if update_every != 1:
        raise ValueError(f"{kind} averages on every step; this EMA has update_every={update_every}")
    if kind == "torch_ema":
        if start_step:
            raise ValueError("torch_ema has no copy phase; this EMA has start_step > 0")
        if isinstance(schedule, schedules.constant):
            return {"decay": schedule.decay, "num_updates": None}
        if isinstance(schedule, schedules.num_updates):
            return {"decay": schedule.decay}
    elif kind == "diffusers":
        fields: dict[str, Any] = {"update_after_step": start_step - 1, "min_decay": 0.0}
        if isinstance(schedule, schedules.constant):
            return {**fields, "decay": schedule.decay, "use_ema_warmup": True, "inv_gamma": 1e-30, "power": 1.0}
        if isinstance(schedule, schedules.num_updates):
            return {**fields, "decay": schedule.decay, "use_ema_warmup": False, "inv_gamma": 1.0, "power": 2 / 3}
        if isinstance(schedule, schedules.inverse_gamma):
            return {
                **fields,
                "decay": schedule.max_decay,
                "min_decay": schedule.min_decay,
                "use_ema_warmup": True,
                "inv_gamma": schedule.inv_gamma,
                "power": schedule.power,
            }
    else:
        return {}
    follows = "constant or num_updates" if kind == "torch_ema" else "constant, num_updates or inverse_gamma"
    raise ValueError(
        f"{kind} cannot continue on the schedule {schedule!r}: it follows {follows} only; export "
        "format='state_dict' for the weights alone"
    )


def to_polyak_state(
    raw: Any,
    kind: str,
    *,
    template: Mapping[str, Any],
    live: Mapping[str, Any],
    param_names: list[str] | None = None,
) -> dict[str, Any]:
    """A polyak state in which every average holds the peer's averaged weights.

    ``template`` is the target EMA's own ``state_dict()`` (its keys, shapes, dtypes, number of averages
    and config) and ``live`` the model's ``state_dict()``: tensors the peer does not average (buffers in
    torch_ema/diffusers) take the live values. Peer tensors are cast to the shadow dtype (Ultralytics
    stores fp16). The peer's step becomes the step; the products are 0 (the weights are the average
    itself, with no bias correction to apply).
    """
    weights, step = averaged_weights(raw, kind, param_names=param_names)
    averages = template["averages"]
    shadows: Mapping[str, Tensor] = averages[0]
    given = {normalize_key(k): v for k, v in weights.items()}
    live_by_key = {normalize_key(str(k)): v for k, v in live.items() if isinstance(v, Tensor)}
    missing = sorted(k for k in shadows if k not in given and not (kind in LIST_FORMATS and k in live_by_key))
    unexpected = sorted(k for k in given if k not in live_by_key)
    if missing or unexpected:
        raise ValueError(
            f"{kind} checkpoint does not match this model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass a model of the same architecture"
        )
    average: dict[str, Tensor] = {}
    for key, dst in shadows.items():
        src = given[key] if key in given else live_by_key[key]
        if src.shape != dst.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: {kind} checkpoint has {tuple(src.shape)}, model has {tuple(dst.shape)}"
            )
        average[key] = src.detach().to(dtype=dst.dtype, device="cpu", copy=True)
    count = len(averages)
    return _state.build(
        step=template["step"] if step is None else step,
        skipped_updates=0,
        products=[0.0] * count,
        last_decays=template["last_decays"],
        config=template["config"],
        averages=[dict(average) for _ in range(count)],
    )


def peer_state(
    kind: str,
    averaged: Mapping[str, Tensor],
    *,
    step: int = 0,
    decay: float = 0.9999,
    raw_model: Mapping[str, Tensor] | None = None,
    param_names: list[str] | None = None,
    schedule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint object ``kind``'s library loads, from averaged weights ``{model key: tensor}``.

    ``raw_model`` (live weights) fills the slots some peers keep (timm ``state_dict``, ema-pytorch
    ``online_model.*``). List formats need ``param_names`` in the peer's order; ``schedule`` holds the
    decay fields of ``peer_schedule`` (else a constant ``decay``).
    """
    averaged = {str(k): v for k, v in averaged.items()}
    if kind == "timm":
        out: dict[str, Any] = {"state_dict_ema": averaged}
        if raw_model is not None:
            out["state_dict"] = dict(raw_model)
        return out
    if kind == "ema_pytorch":
        out = {"initted": torch.tensor(True), "step": torch.tensor(int(step))}
        out.update({f"ema_model.{k}": v for k, v in averaged.items()})
        out.update({f"online_model.{k}": v for k, v in (raw_model if raw_model is not None else averaged).items()})
        return out
    if kind == "averaged_model":
        out = {f"module.{k}": v for k, v in averaged.items()}
        out["n_averaged"] = torch.tensor(int(step), dtype=torch.long)
        return out
    if kind == "state_dict":
        return dict(averaged)
    if kind in LIST_FORMATS:
        if param_names is None:
            raise ValueError(
                f"{kind} stores averages as an unnamed list in parameter order; exporting needs the model "
                "(polyak.io.export(path, ema, format=...))"
            )
        missing = [n for n in param_names if n not in averaged]
        if missing:
            raise ValueError(f"cannot export to {kind}: no averaged value for parameters {missing[:20]}")
        shadows = [averaged[n] for n in param_names]
        if kind == "torch_ema":
            fields = {"decay": float(decay), "num_updates": int(step), **(schedule or {})}
            return {**fields, "shadow_params": shadows, "collected_params": None}
        fields = {
            "decay": float(decay),
            "min_decay": 0.0,
            "optimization_step": int(step),
            "update_after_step": -1,
            "use_ema_warmup": False,
            "inv_gamma": 1.0,
            "power": 2 / 3,
            **(schedule or {}),
        }
        return {**fields, "shadow_params": shadows}
    if kind == "ultralytics":
        raise ValueError("Ultralytics checkpoints pickle the whole model; export them with polyak.io.export(path, ema)")
    raise ValueError(f"unknown format {kind!r}; choose one of {PEER_FORMATS}")
