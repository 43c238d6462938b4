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
peer's step counter becomes ``ema.step``; decay schedules are not stored by most peers, so pass
``decay=`` to continue with the peer's rule.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyak._select import normalize_key
from polyak.io import _writers

__all__ = ["PEER_FORMATS", "averaged_weights", "detect", "export", "from_peer", "peer_state", "to_polyak_state"]

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


def _param_names(model: nn.Module, kind: str) -> list[str]:
    if kind == "torch_ema":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in model.named_parameters()]


def _tensor_dict(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"corrupt {what}: expected a mapping of tensors, got {type(obj).__name__}")
    out = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return out


def averaged_weights(
    raw: Any, kind: str, *, param_names: list[str] | None = None
) -> tuple[dict[str, Tensor], int | None]:
    """The peer's averaged weights ``{model key: tensor}`` and its step counter (None when it keeps none).

    List formats (torch_ema, diffusers) need ``param_names``: the model's parameter names in the order
    the peer was given them.
    """
    if kind not in PEER_FORMATS:
        raise ValueError(f"unknown format {kind!r}; choose one of {PEER_FORMATS}")
    if kind == "timm":
        state = raw.get("state_dict_ema", raw)
        return {normalize_key(k): v for k, v in _tensor_dict(state, "timm EMA state").items()}, None
    if kind == "ema_pytorch":
        weights = {
            k[len("ema_model.") :]: v
            for k, v in _tensor_dict(raw, "ema-pytorch state").items()
            if k.startswith("ema_model.")
        }
        return weights, int(raw["step"]) if "step" in raw else None
    if kind == "averaged_model":
        weights = {
            k[len("module.") :]: v
            for k, v in _tensor_dict(raw, "AveragedModel state").items()
            if k.startswith("module.")
        }
        return weights, int(raw["n_averaged"])
    if kind == "ultralytics":
        module = raw.get("ema") if raw.get("ema") is not None else raw.get("model")
        if not isinstance(module, nn.Module):
            raise ValueError("Ultralytics checkpoint without an 'ema' or 'model' module")
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, int(raw.get("updates") or 0)
    if kind == "state_dict":
        return _tensor_dict(raw, "state dict"), None
    shadows = raw["shadow_params"]
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
    step = raw.get(step_key)
    return dict(zip(param_names, shadows)), None if step is None else int(step)


def raw_model_state(raw: Any, kind: str) -> dict[str, Tensor] | None:
    """The live (non-averaged) weights a peer checkpoint also holds, if any."""
    if kind == "timm" and isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        return _tensor_dict(raw["state_dict"], "timm state_dict")
    if kind == "ema_pytorch":
        online = {k[len("online_model.") :]: v for k, v in raw.items() if str(k).startswith("online_model.")}
        return online or None
    if kind == "ultralytics" and isinstance(raw.get("model"), nn.Module):
        return dict(raw["model"].state_dict())
    return None


def to_polyak_state(raw: Any, ema: Any, *, kind: str) -> dict[str, Any]:
    """A polyak ``state_dict`` for ``ema`` in which every average holds the peer's averaged weights.

    Tensors the peer does not average (buffers in torch_ema/diffusers) take the model's live values.
    Peer tensors are cast to the shadow dtype (Ultralytics stores fp16).
    """
    weights, step = averaged_weights(
        raw, kind, param_names=_param_names(ema.model, kind) if kind in LIST_FORMATS else None
    )
    ref = ema.state_dict()
    template: dict[str, Tensor] = ref["averages"][0]
    given = {normalize_key(k): v for k, v in weights.items()}
    live = {normalize_key(k): v for k, v in ema.model.state_dict().items()}
    missing = sorted(k for k in template if k not in given and not (kind in LIST_FORMATS and k in live))
    unexpected = sorted(k for k in given if k not in live)
    if missing or unexpected:
        raise ValueError(
            f"{kind} checkpoint does not match this model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass a model of the same architecture"
        )
    average: dict[str, Tensor] = {}
    for key, dst in template.items():
        src = given[key] if key in given else live[key]
        if src.shape != dst.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: {kind} checkpoint has {tuple(src.shape)}, model has {tuple(dst.shape)}"
            )
        average[key] = src.detach().to(dtype=dst.dtype, device="cpu", copy=True)
    state = dict(ref)
    state["averages"] = [dict(average) for _ in range(ema.num_averages)]
    state["products"] = [0.0] * ema.num_averages  # the weights are the average itself (no bias correction)
    if step is not None:
        state["step"] = int(step)
    return state


def from_peer(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    format: str = "auto",
    trust_pickle: bool = False,
    **ema_kwargs: Any,
) -> Any:
    """Build a ``polyak.EMA`` on ``model`` from a peer checkpoint file (``ema_kwargs`` go to ``EMA``).

    ``format="auto"`` detects it. Without ``decay=``, torch_ema/diffusers files give their stored constant
    decay; other peers do not store theirs, and polyak's default (0.9999) applies. Ultralytics files need ``trust_pickle=True`` (UNSAFE: unpickling runs
    code from the file; only for files you made yourself).
    """
    from polyak.ema import EMA
    from polyak.io._checkpoint import read

    ckpt = read(path, trust_pickle=trust_pickle)
    kind = ckpt.kind if format == "auto" else format
    if kind == "polyak":
        raise ValueError(f"{str(path)!r} is a polyak checkpoint; use polyak.load(path, ema)")
    if "decay" not in ema_kwargs and kind in LIST_FORMATS and isinstance(ckpt.raw.get("decay"), float):
        ema_kwargs["decay"] = ckpt.raw["decay"]  # the constant decay torch_ema/diffusers store
    ema = EMA(model, **ema_kwargs)
    ema.load_state_dict(to_polyak_state(ckpt.raw, ema, kind=kind))
    return ema


# --- export -------------------------------------------------------------------------------------------
def peer_state(
    kind: str,
    averaged: Mapping[str, Tensor],
    *,
    step: int = 0,
    decay: float = 0.9999,
    raw_model: Mapping[str, Tensor] | None = None,
    param_names: list[str] | None = None,
    start_step: int = 0,
) -> dict[str, Any]:
    """The checkpoint object ``kind``'s library loads, from averaged weights ``{model key: tensor}``.

    ``raw_model`` (live weights) fills the slots some peers keep (timm ``state_dict``, ema-pytorch
    ``online_model.*``). List formats need ``param_names`` in the peer's order.
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
            return {"decay": float(decay), "num_updates": int(step), "shadow_params": shadows, "collected_params": None}
        return {
            "decay": float(decay),
            "min_decay": 0.0,
            "optimization_step": int(step),
            "update_after_step": int(start_step),
            "use_ema_warmup": False,
            "inv_gamma": 1.0,
            "power": 2 / 3,
            "shadow_params": shadows,
        }
    if kind == "ultralytics":
        raise ValueError("Ultralytics checkpoints pickle the whole model; export them with polyak.io.export(path, ema)")
    raise ValueError(f"unknown format {kind!r}; choose one of {PEER_FORMATS}")


def _current_decay(ema: Any, index: int) -> float:
    t = max(1, ema.step - ema.start_step)
    return float(ema.schedules[index](t))


def export(path: str | os.PathLike[str], ema: Any, *, format: str, index: int = 0) -> Path:
    """Write average ``index`` of ``ema`` as a checkpoint ``format``'s library loads (atomically).

    torch_ema/diffusers get the decay of the current step as their constant ``decay``; Ultralytics gets
    a deep copy of the model holding the averaged weights (a pickle: loading it needs trust).
    """
    from polyak.io._atomic import check_writable_destination

    check_writable_destination(path)
    averaged = ema.averaged_state_dict(index)
    if format == "ultralytics":
        averaged_model = copy.deepcopy(ema.model)
        averaged_model.load_state_dict(averaged)
        obj: Any = {"ema": averaged_model, "updates": int(ema.step), "model": copy.deepcopy(ema.model), "epoch": -1}
    else:
        names = _param_names(ema.model, format) if format in LIST_FORMATS else None
        obj = peer_state(
            format,
            averaged,
            step=int(ema.step),
            decay=_current_decay(ema, index),
            raw_model=ema.model.state_dict(),
            param_names=names,
            start_step=int(ema.start_step),
        )
    if format == "state_dict" and Path(path).suffix.lower() == ".safetensors":
        return save_plain_safetensors(path, obj)
    return _writers.save_torch(path, obj)


def save_plain_safetensors(path: str | os.PathLike[str], state: Mapping[str, Tensor]) -> Path:
    """Write ``{key: tensor}`` as a plain safetensors file (streamed, atomic) that ``load_file`` and
    ``model.load_state_dict`` take: every key present, a tied tensor stored under each of its names."""
    from polyak.io import _tree

    _, tensors = _tree.flatten({str(k): v for k, v in state.items()}, "", share=False)
    if set(tensors) != {str(k) for k in state}:
        raise ValueError("keys with '.'-joined collisions cannot be stored in one safetensors file")
    return _writers.save_safetensors(path, tensors, {"format": "pt"})
