"""``polyak.save`` / ``polyak.load``: one file holding the EMA state, and optionally the raw model, the
optimizer and extra user data, written atomically and verified on load.

Formats:

* ``"safetensors"`` (default): tensors under dotted names (``ema.averages.0.<key>``, ``model.<key>``,
  ``optimizer.state.0.exp_avg``...), everything else as a JSON skeleton in the header metadata
  (see ``polyak.io._tree``), plus ``payload_bytes`` and a ``sha256`` of the tensor bytes, so a truncated
  or corrupted file is detected and named. Loading never runs code.
* ``"pt"``: ``torch.save`` of the same nested dict, read back with ``torch.load(weights_only=True)``
  (no arbitrary code; a pickle that tries to build other objects is refused). Chosen for paths ending
  in ``.pt``/``.pth``/``.ckpt``/``.bin``.

Optimizer state goes into the safetensors file too: its ``state_dict()`` is a tree of tensors, numbers
and lists, split by the same skeleton (int keys and tuples survive), so a resume is bitwise exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polyak._kernels import finite_on_host
from polyak.io import _tree, _writers
from polyak.io._atomic import check_writable_destination

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "FileFormat", "load", "read", "save"]

CHECKPOINT_FORMAT = "polyak.checkpoint"
CHECKPOINT_VERSION = 1
FileFormat = Literal["safetensors", "pt"]
_PT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass
class Checkpoint:
    """What a checkpoint file holds. ``kind`` is ``"polyak"`` for files written by ``polyak.save``,
    else the detected peer format (``"timm"``, ``"ema_pytorch"``, ``"torch_ema"``, ``"diffusers"``,
    ``"averaged_model"``, ``"ultralytics"``, ``"state_dict"``)."""

    kind: str
    ema: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    extra: Any = None
    raw: Any = None  # the file's own top-level object (peer formats)
    metadata: dict[str, str] = field(default_factory=dict)


def file_format_for(path: str | os.PathLike[str], format: str | None) -> FileFormat:
    if format is None:
        return "pt" if Path(path).suffix.lower() in _PT_SUFFIXES else "safetensors"
    if format not in ("safetensors", "pt"):
        raise ValueError(f"format must be 'safetensors' or 'pt', got {format!r}")
    return format  # type: ignore[return-value]


# --- saving -------------------------------------------------------------------------------------------
def save(
    path: str | os.PathLike[str],
    ema: Any = None,
    *,
    model: nn.Module | Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    extra: Any = None,
    format: FileFormat | None = None,
) -> Path:
    """Write ``ema`` (a ``polyak.EMA`` or its ``state_dict()``), and optionally the raw ``model``, the
    ``optimizer`` and ``extra`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically.

    The format follows the suffix (``.pt``/``.pth``/``.ckpt``/``.bin`` -> torch, else safetensors) unless
    ``format`` is given. A failed write (full disk, kill) leaves the previous file intact.
    """
    fmt = file_format_for(path, format)
    check_writable_destination(path)  # fail before serialising anything
    payload = {
        "ema": _state_of(ema, "ema"),
        "model": _state_of(model, "model"),
        "optimizer": _state_of(optimizer, "optimizer"),
        "extra": extra,
    }
    if all(v is None for v in payload.values()):
        raise ValueError("nothing to save: pass an EMA and/or model=, optimizer=, extra=")
    if fmt == "pt":
        return _writers.save_torch(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload})
    skeleton, tensors = _tree.flatten(payload, "")
    metadata = _header_metadata(payload)
    metadata["tree"] = json.dumps(skeleton)
    return _writers.save_safetensors(path, tensors, metadata)


def _state_of(obj: Any, what: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict):
        return state_dict()
    raise TypeError(f"{what}= must be an object with state_dict() or a mapping, got {type(obj).__name__}")


def _header_metadata(payload: dict[str, Any]) -> dict[str, str]:
    from polyak import __version__

    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "polyak_version": __version__}
    ema = payload.get("ema")
    if isinstance(ema, Mapping):  # readable at a glance by any safetensors tool
        meta["ema_step"] = str(ema.get("step"))
        meta["ema_config"] = json.dumps(ema.get("config"), default=str)
    return meta


# --- reading ------------------------------------------------------------------------------------------
def read(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Read any supported checkpoint into a :class:`Checkpoint` without touching a model.

    Verifies size and checksum of polyak safetensors files (streamed: the file is not held twice in
    memory); ``.pt`` files load with ``weights_only=True`` unless ``trust_pickle=True`` (UNSAFE:
    unpickling can run arbitrary code; only for files you made yourself, e.g. Ultralytics checkpoints
    that pickle the whole model).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{str(target)!r} is a directory, not a checkpoint file")
    if not target.exists():
        raise FileNotFoundError(f"no such checkpoint: {str(target)!r}")
    with open(target, "rb") as handle:
        head = handle.read(9)
    if _looks_like_torch(head):
        return _from_object(_torch_load(target, trust_pickle), target)
    return _read_safetensors(target)


def _looks_like_torch(head: bytes) -> bool:
    """torch.save writes a zip (``PK\\x03\\x04``) or, in the legacy format, a pickle (``\\x80``). A
    safetensors file starts with its header length and has ``{`` at byte 8; the length's own bytes can be
    ``\\x80`` or ``PK``, so the ``{`` decides first."""
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _read_safetensors(target: Path) -> Checkpoint:
    """Check the header against the file size (truncation is named), stream the sha256 of the tensor
    bytes, then load the tensors."""
    from safetensors.torch import load_file

    name = str(target)
    size = target.stat().st_size
    with open(target, "rb") as handle:
        first = handle.read(8)
        if len(first) < 8:
            raise ValueError(f"{name!r} is truncated or not a checkpoint: only {size} bytes")
        header_len = int.from_bytes(first, "little")
        if header_len > 100_000_000:
            raise ValueError(f"{name!r} is not a safetensors or torch checkpoint (unrecognised first bytes)")
        if 8 + header_len > size:
            raise ValueError(
                f"{name!r} is truncated: the safetensors header needs {header_len} bytes but the file ends after "
                f"{size - 8}; the write was interrupted, restore it from a previous copy"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{name!r} is not a safetensors or torch checkpoint (header is not JSON: {exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{name!r} is not a safetensors checkpoint (header is not a JSON object)")
        meta = header.get("__metadata__") or {}
        data_len = size - 8 - header_len
        try:
            needed = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            declared = int(meta["payload_bytes"]) if "payload_bytes" in meta else needed
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{name!r} is not a valid safetensors file (malformed header)") from None
        if data_len < max(needed, declared):
            raise ValueError(
                f"{name!r} is truncated: {data_len} bytes of tensor data, the header declares "
                f"{max(needed, declared)}; the write was interrupted, restore it from a previous copy"
            )
        if "sha256" in meta:
            digest = hashlib.sha256()
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
            if digest.hexdigest() != meta["sha256"]:
                raise ValueError(
                    f"{name!r} is corrupt: the sha256 of its tensor data does not match the one saved with it"
                )
    try:
        tensors = load_file(target, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"{name!r} is not a valid safetensors file: {exc}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:  # a plain safetensors file, e.g. extracted weights
        return Checkpoint(kind="state_dict", model=dict(tensors), raw=dict(tensors), metadata=dict(meta))
    _check_version(meta.get("version"), name)
    try:
        tree = _tree.unflatten(json.loads(meta["tree"]), dict(tensors))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name!r} is corrupt: its metadata has no readable 'tree' ({exc})") from None
    return _polyak_checkpoint(tree, metadata=dict(meta))


def _polyak_checkpoint(tree: Mapping[str, Any], metadata: dict[str, str] | None = None) -> Checkpoint:
    """A polyak checkpoint's sections, read from either file format's decoded tree."""
    return Checkpoint(
        kind="polyak",
        ema=tree.get("ema"),
        model=tree.get("model"),
        optimizer=tree.get("optimizer"),
        extra=tree.get("extra"),
        raw=tree,
        metadata=dict(metadata or {}),
    )


def _check_version(version: object, name: str) -> None:
    try:
        number = int(str(version))
    except ValueError:
        raise ValueError(f"{name!r}: unreadable checkpoint version {version!r}") from None
    if number > CHECKPOINT_VERSION:
        raise ValueError(
            f"{name!r} was written by a newer polyak (checkpoint version {number}, this one reads "
            f"<= {CHECKPOINT_VERSION}); upgrade polyak"
        )


def _torch_load(target: Path, trust_pickle: bool) -> Any:
    name = str(target)
    try:
        return torch.load(target, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to unpickle {name!r}: it holds objects other than tensors and plain containers, and "
            f"unpickling them could run arbitrary code ({first}). If you made this file yourself and trust it, "
            "pass trust_pickle=True (UNSAFE for files from others)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ValueError(f"{name!r} is truncated or corrupt: torch could not read it ({detail})") from None


def _from_object(obj: Any, target: Path) -> Checkpoint:
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        _check_version(obj.get("version"), str(target))
        return _polyak_checkpoint(obj)
    from polyak.io.peers import detect

    kind = detect(obj)
    return Checkpoint(kind=kind, raw=obj)


# --- loading into live objects ------------------------------------------------------------------------
def load(
    path: str | os.PathLike[str],
    ema: Any = None,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Read ``path`` and restore what it holds into ``ema``, ``model`` and ``optimizer`` (each optional).

    Everything is validated before anything changes: a missing section, missing/unexpected keys,
    shape/dtype mismatches and NaN/inf raise ValueError and leave all three untouched. Peer checkpoints
    (timm, ema-pytorch, torch_ema, diffusers, AveragedModel, Ultralytics) load into ``ema`` too: their
    averaged weights become every average of ``ema``. Returns the :class:`Checkpoint` (``.extra`` etc.).
    """
    ckpt = read(path, trust_pickle=trust_pickle)
    name = str(path)
    ema_state: Mapping[str, Any] | None = None
    if ema is not None:
        if ckpt.kind == "polyak":
            if ckpt.ema is None:
                raise ValueError(f"{name!r} holds no EMA state (it was saved without one); load it with ema=None")
            ema_state = ckpt.ema
        else:
            from polyak.io.peers import to_polyak_state

            ema_state = to_polyak_state(ckpt.raw, ema, kind=ckpt.kind)
            ckpt.ema = dict(ema_state)
    model_state = None
    if model is not None:
        model_state = ckpt.model
        if model_state is None and ckpt.kind != "polyak":
            from polyak.io.peers import raw_model_state

            model_state = raw_model_state(ckpt.raw, ckpt.kind)
        if model_state is None:
            raise ValueError(f"{name!r} holds no raw model weights (saved without model=); load it with model=None")
        check_model_state(model, model_state, what=name)
    if optimizer is not None:
        if ckpt.optimizer is None:
            raise ValueError(
                f"{name!r} holds no optimizer state (saved without optimizer=); load it with optimizer=None"
            )
        check_optimizer_state(optimizer, ckpt.optimizer, what=name)
    if ema_state is not None:
        ema.load_state_dict(ema_state)  # validates everything before changing anything
    if model is not None and model_state is not None:
        _load_model(model, model_state)
    if optimizer is not None and ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    return ckpt


def _matching(model: nn.Module, state: Mapping[str, Any]) -> dict[str, str]:
    from polyak._select import normalize_key

    by_norm = {normalize_key(str(k)): str(k) for k in state}
    return {key: by_norm.get(normalize_key(key), "") for key in model.state_dict()}


def check_model_state(model: nn.Module, state: Mapping[str, Any], *, what: str) -> None:
    """Raise ValueError (listing keys) unless ``state`` fits ``model`` exactly: same keys (wrapper
    prefixes ignored), shapes and dtypes, finite floats."""
    from polyak._select import normalize_key

    own = model.state_dict()
    mapping = _matching(model, state)
    missing = sorted(k for k, v in mapping.items() if not v)
    known = {normalize_key(k) for k in own}
    unexpected = sorted(str(k) for k in state if normalize_key(str(k)) not in known)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the model weights do not match this model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass a model of the same architecture"
        )
    for key, src_key in mapping.items():
        dst, src = own[key], state[src_key]
        if not isinstance(src, Tensor):
            raise ValueError(f"{what}: {src_key!r} is a {type(src).__name__}, not a tensor")
        if src.shape != dst.shape:
            raise ValueError(
                f"{what}: shape mismatch for {key!r}: file has {tuple(src.shape)}, model has {tuple(dst.shape)}"
            )
        if src.dtype != dst.dtype:
            raise ValueError(
                f"{what}: dtype mismatch for {key!r}: file has {src.dtype}, model has {dst.dtype}; "
                f"convert the model first (model.to({src.dtype}))"
            )
        if not finite_on_host([src]):
            raise ValueError(f"{what}: {key!r} holds NaN/inf; refusing to load corrupt weights")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], *, what: str) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, done up front so a mismatch changes nothing."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), Mapping):
        raise ValueError(f"{what}: corrupt optimizer state (expected 'state' and 'param_groups')")
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        raise ValueError(
            f"{what}: the optimizer state has {len(groups)} parameter group(s), this optimizer has {len(ours)}; "
            "build the optimizer the same way as when saving"
        )
    for i, (saved, own) in enumerate(zip(groups, ours)):
        if len(saved.get("params", [])) != len(own["params"]):
            raise ValueError(
                f"{what}: optimizer parameter group {i} holds {len(saved.get('params', []))} parameters in the "
                f"file and {len(own['params'])} here; build the optimizer over the same parameters"
            )


def _load_model(model: nn.Module, state: Mapping[str, Any]) -> None:
    mapping = _matching(model, state)
    model.load_state_dict({key: state[src] for key, src in mapping.items()}, strict=True)
