"""Files in other libraries' formats: ``from_peer`` builds an EMA from one, ``export`` writes one, and
``save_plain`` writes a plain ``{key: tensor}`` file. The conversions themselves are the pure functions
of ``polyak.io.peers``; this module adds the files and the ``EMA``."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from polyak.ema import EMA
from polyak.io import _tree, _writers, peers
from polyak.io._atomic import check_writable_destination
from polyak.io._checkpoint import file_format_for, peer_state_for, read

__all__ = ["export", "from_peer", "save_plain", "write_state"]


def from_peer(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    format: str = "auto",
    trust_pickle: bool = False,
    **ema_kwargs: Any,
) -> EMA:
    """Build a ``polyak.EMA`` on ``model`` from a peer checkpoint file (``ema_kwargs`` go to ``EMA``).

    ``format="auto"`` detects it. Unless given, ``decay`` and ``start_step`` come from what torch_ema
    and diffusers files store (see ``peers.schedule_of``); timm, ema-pytorch, Ultralytics and
    ``AveragedModel`` files do not store theirs, so ``decay=`` is required for them (EMA's default, a
    power-function EMA counted from the file's step, would replace the imported average at the first
    update of a file with no step). Ultralytics files need ``trust_pickle=True`` (UNSAFE:
    unpickling runs code from the file; only for files you made yourself).
    """
    ckpt = read(path, trust_pickle=trust_pickle)
    kind = ckpt.kind if format == "auto" else format
    if kind == "polyak":
        raise ValueError(f"{str(path)!r} is a polyak checkpoint; use polyak.load(path, ema)")
    try:
        stored = peers.schedule_of(ckpt.raw, kind)
    except ValueError:
        if "decay" not in ema_kwargs:
            raise
        stored = None  # the caller chose the decay; a stored rule polyak cannot follow does not matter
    if stored is not None:
        ema_kwargs.setdefault("decay", stored[0])
        ema_kwargs.setdefault("start_step", stored[1])
    elif "decay" not in ema_kwargs:
        raise ValueError(
            f"{str(path)!r} is a {kind} checkpoint, which does not store the decay it was averaged with; "
            f"pass decay= to from_peer (the one your {kind} EMA used, e.g. decay=0.9998) so the imported "
            "average continues on it"
        )
    ema = EMA(model, **ema_kwargs)
    ema.load_state_dict(peer_state_for(ema, ckpt.raw, kind))
    return ema


def export(path: str | os.PathLike[str], ema: EMA, *, format: str, index: int = 0) -> Path:
    """Write average ``index`` of ``ema`` as a checkpoint ``format``'s library loads (atomically).

    torch_ema and diffusers get the fields with which they continue on the same schedule
    (``peers.peer_schedule``; a schedule they cannot follow raises ValueError); Ultralytics gets a deep
    copy of the model holding the averaged weights (a pickle: loading it needs trust).
    """
    if not isinstance(ema, EMA):
        raise TypeError(f"export expects a polyak.EMA, got {type(ema).__name__}")
    index = ema.check_index(index)
    if format not in peers.PEER_FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {peers.PEER_FORMATS}")
    check_writable_destination(path)
    schedule = ema.schedules[index]
    fields = peers.peer_schedule(format, schedule, start_step=ema.start_step, update_every=ema.update_every)
    averaged = ema.averaged_state_dict(index)
    if format == "ultralytics":
        averaged_model = copy.deepcopy(ema.model)
        averaged_model.load_state_dict(averaged)
        updates = max(0, ema.step - ema.start_step)  # Ultralytics' decay is a function of its own count
        obj: Any = {"ema": averaged_model, "updates": updates, "model": copy.deepcopy(ema.model), "epoch": -1}
        return _writers.save_torch(path, obj)
    names = peers.param_names(ema.model, format) if format in peers.LIST_FORMATS else None
    # AveragedModel counts the models averaged; the others count every update (torch_ema has no copy
    # phase, diffusers' update_after_step covers ours)
    step = max(0, ema.step - ema.start_step) if format == "averaged_model" else ema.step
    obj = peers.peer_state(
        format,
        averaged,
        step=step,
        raw_model=ema.model.state_dict(),
        param_names=names,
        schedule=fields,
    )
    return write_state(path, obj, kind=format)


def write_state(path: str | os.PathLike[str], obj: Mapping[str, Any], *, kind: str) -> Path:
    """Write a peer checkpoint object: a flat ``{name: tensor}`` as plain safetensors when ``path``
    says so, anything else with ``torch.save``."""
    if file_format_for(path, None) == "pt":
        return _writers.save_torch(path, dict(obj))
    if kind == "timm" and isinstance(obj.get("state_dict_ema"), Mapping):
        obj = obj["state_dict_ema"]  # a timm .safetensors file holds the (averaged) state dict itself
    return save_plain(path, obj, what=f"a {kind} checkpoint")


def save_plain(path: str | os.PathLike[str], state: Mapping[str, Any], *, what: str = "this state") -> Path:
    """Write ``{key: tensor}`` as a plain safetensors file (streamed, atomic) that ``load_file`` and
    ``model.load_state_dict`` take: every key present, a tied tensor stored under each of its names."""
    others = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if others:
        raise ValueError(
            f"{what} holds values that are not tensors ({', '.join(others[:5])}); a safetensors file holds "
            "tensors only: write a .pt/.pth file instead"
        )
    _, tensors = _tree.flatten({str(k): v for k, v in state.items()}, "", share=False)
    return _writers.save_safetensors(path, tensors, {"format": "pt"})
