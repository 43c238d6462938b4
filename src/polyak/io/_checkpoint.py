"""``polyak.save`` / ``polyak.load``: one file holding the EMA state, and optionally the raw model, the
optimizer and extra user data, written atomically and verified on load.

Formats:

* ``"safetensors"`` (default): tensors under dotted names (``ema.averages.0.<key>``, ``model.<key>``,
  ``optimizer.state.0.exp_avg``...), everything else as a JSON skeleton in the header metadata
  (see ``polyak.io._tree``), plus ``payload_bytes`` and a ``checksum`` (sha256 of the header and the
  tensor bytes), so a truncated, corrupted or edited file is detected and named. Loading never runs code.
* ``"pt"``: ``torch.save`` of the same nested dict, read back with ``torch.load(weights_only=True)``
  (no arbitrary code; a pickle that tries to build other objects is refused). Chosen for paths ending
  in ``.pt``/``.pth``/``.ckpt``/``.bin``.

Optimizer state goes into the safetensors file too: its ``state_dict()`` is a tree of tensors, numbers
and lists, split by the same skeleton (int keys and tuples survive), so a resume is bitwise exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polyak._kernels import finite_on_host
from polyak._select import normalize_key
from polyak._sharding import is_dtensor, is_sharded
from polyak.ema import EMA
from polyak.io import _readers, _tree, _writers, peers
from polyak.io._atomic import check_writable_destination
from polyak.io.peers import detect

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "FileFormat", "load", "read", "save"]

CHECKPOINT_FORMAT = "polyak.checkpoint"
CHECKPOINT_VERSION = 2  # 2: the checksum covers the header too (version 1 files still load)
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
    ema: EMA | Mapping[str, Any] | None = None,
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

    Sharded states (an EMA of a model with DTensor parameters, e.g. FSDP2, or built with ``shard=True``;
    such a ``model=`` or ``optimizer=``) make ``save`` a collective that every rank must call: it writes one standard file
    from rank 0, gathering one tensor at a time (``"safetensors"``: straight into the file; ``"pt"``:
    into host memory first), and loads into a plain single-process EMA as it is.
    """
    fmt = file_format_for(path, format)
    payload = {
        "ema": _state_of(ema, "ema"),
        "model": _state_of(model, "model"),
        "optimizer": _state_of(optimizer, "optimizer"),
        "extra": extra,
    }
    if all(v is None for v in payload.values()):
        raise ValueError("nothing to save: pass an EMA and/or model=, optimizer=, extra=")
    rank0 = _sharded_destination(path, payload)  # None: nothing sharded
    if rank0 is None:
        check_writable_destination(path)  # fail before serialising anything
    if fmt == "pt":
        if rank0 is not None:
            payload = _gathered(payload, rank0)
            if not rank0:
                return Path(path)
        return _writers.save_torch(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload})
    skeleton, tensors = _tree.flatten(payload, "")
    metadata = _header_metadata(payload)
    metadata["tree"] = json.dumps(skeleton)
    if rank0 is not None:
        return _writers.save_safetensors_from_rank0(path, tensors, metadata, rank0=rank0)
    return _writers.save_safetensors(path, tensors, metadata)


def _any_sharded(tree: Any) -> bool:
    if isinstance(tree, Mapping):
        return any(_any_sharded(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_any_sharded(v) for v in tree)
    return is_sharded(tree)


def _sharded_destination(path: str | os.PathLike[str], payload: Any) -> bool | None:
    """None when no tensor is sharded (a DTensor, a rank-sharded range); else whether this is rank 0,
    after rank 0 checked ``path`` and every rank learned the outcome (one broadcast), so that no rank
    waits in a gather that rank 0 left."""
    if not _any_sharded(payload):
        return None
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    problem: list[BaseException | None] = [None]
    if rank0:
        try:
            check_writable_destination(path)
        except OSError as exc:
            problem[0] = exc
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise problem[0]
    return rank0


def _gathered(tree: Any, keep: bool) -> Any:
    """``tree`` with every sharded tensor (``_sharding.is_sharded``) gathered, in order, to a full CPU
    tensor (a collective); the other ranks (``keep=False``) only take part in the gathers."""
    if is_sharded(tree):
        full = tree.full_tensor().cpu()
        return full if keep else None
    if isinstance(tree, Mapping):
        return {k: _gathered(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_gathered(v, keep) for v in tree)
    return tree


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

    The file is opened once and everything comes from that handle (see ``polyak.io._readers``):
    safetensors headers are checked field by field and polyak's checksum covers header and tensors;
    ``.pt`` archives have every CRC-32 checked and load with ``weights_only=True`` unless
    ``trust_pickle=True`` (UNSAFE: unpickling can run arbitrary code; only for files you made yourself,
    e.g. Ultralytics checkpoints that pickle the whole model). Any damaged or crafted file raises a
    ValueError naming it.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{str(target)!r} is a directory, not a checkpoint file")
    if not target.exists():
        raise FileNotFoundError(f"no such checkpoint: {str(target)!r}")
    name = str(target)
    with open(target, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(9)
        handle.seek(0)
        if _looks_like_torch(head):
            return _from_object(_readers.read_torch(handle, name, size, trust_pickle=trust_pickle), name)
        return _from_safetensors(_readers.read_safetensors(handle, name, size), name)


def _looks_like_torch(head: bytes) -> bool:
    """torch.save writes a zip (``PK\\x03\\x04``) or, in the legacy format, a pickle (``\\x80``). A
    safetensors file starts with its header length and has ``{`` at byte 8; the length's own bytes can be
    ``\\x80`` or ``PK``, so the ``{`` decides first."""
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _from_safetensors(file: _readers.SafetensorsFile, name: str) -> Checkpoint:
    meta = file.metadata
    if meta.get("format") != CHECKPOINT_FORMAT:  # a plain safetensors file, e.g. extracted weights
        return Checkpoint(kind="state_dict", model=dict(file.tensors), raw=dict(file.tensors), metadata=dict(meta))
    version = _check_version(meta.get("version"), name)
    if version >= 2 and "checksum" not in meta:
        raise ValueError(f"{name!r} is corrupt: a version {version} polyak checkpoint must carry a checksum")
    if "tree" not in meta:
        raise ValueError(f"{name!r} is corrupt: its metadata has no 'tree'")
    skeleton = _readers.load_json(meta["tree"], name, "metadata tree")
    try:
        tree = _tree.unflatten(skeleton, dict(file.tensors))
    except RecursionError:
        raise ValueError(f"{name!r} is corrupt: its metadata tree nests too deeply to be a checkpoint") from None
    except ValueError as exc:
        raise ValueError(f"{name!r}: {exc}") from None
    if not isinstance(tree, Mapping):
        raise ValueError(f"{name!r} is corrupt: its metadata tree is not a mapping of sections")
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


def _check_version(version: object, name: str) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, str)) or not str(version).isdecimal():
        raise ValueError(f"{name!r}: unreadable checkpoint version {version!r}")
    number = int(version)
    if number > CHECKPOINT_VERSION:
        raise ValueError(
            f"{name!r} was written by a newer polyak (checkpoint version {number}, this one reads "
            f"<= {CHECKPOINT_VERSION}); upgrade polyak"
        )
    return number


def _from_object(obj: Any, name: str) -> Checkpoint:
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        _check_version(obj.get("version"), name)
        return _polyak_checkpoint(obj)
    try:
        kind = detect(obj)
    except ValueError as exc:
        raise ValueError(f"{name!r}: {exc}") from None
    return Checkpoint(kind=kind, raw=obj)


# --- loading into live objects ------------------------------------------------------------------------
def load(
    path: str | os.PathLike[str],
    ema: EMA | None = None,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Read ``path`` and restore what it holds into ``ema``, ``model`` and ``optimizer`` (each optional).

    All or nothing: every section is checked before any is written (keys, shapes, dtypes, layouts,
    NaN/inf, counters; the optimizer state is first loaded into a shallow copy of ``optimizer``, so
    whatever its ``load_state_dict`` would refuse, e.g. an SGD state for AdamW, is refused here), then
    the EMA, the optimizer and the model are written in that order; a failure raises ValueError and
    leaves all three as they were. Where the model runs code of its own while loading (load hooks,
    ``set_extra_state``, a ``_load_from_state_dict`` defined outside torch), which can fail only while
    it writes, the three states are copied first and put back if the model's load fails (a transient
    copy of the model's weights and of the averages; the optimizer's old state is kept by reference). Peer checkpoints (timm, ema-pytorch, torch_ema, diffusers,
    AveragedModel, Ultralytics) load into ``ema`` too: their averaged weights become every average of
    ``ema``. Returns the :class:`Checkpoint` (``.extra`` etc.).
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
            ema_state = peer_state_for(ema, ckpt.raw, ckpt.kind)
            ckpt.ema = dict(ema_state)
    model_state = None
    if model is not None:
        model_state = ckpt.model
        if model_state is None and ckpt.kind != "polyak":
            model_state = peers.raw_model_state(ckpt.raw, ckpt.kind)
        if model_state is None:
            raise ValueError(f"{name!r} holds no raw model weights (saved without model=); load it with model=None")
        check_model_state(model, model_state, what=name)
    if optimizer is not None:
        if ckpt.optimizer is None:
            raise ValueError(
                f"{name!r} holds no optimizer state (saved without optimizer=); load it with optimizer=None"
            )
        check_optimizer_state(optimizer, ckpt.optimizer, what=name)
    restore = None
    if model is not None and model_state is not None and _runs_own_load_code(model):
        restore = _Backup.of(
            model, ema if ema_state is not None else None, optimizer if ckpt.optimizer is not None else None
        )
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)  # checks everything before it writes: nothing written on failure
    if optimizer is not None and ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)  # succeeded on a copy in check_optimizer_state
    if model is not None and model_state is not None:
        try:
            _load_model(model, model_state)  # checked; only the model's own load code can still fail
        except Exception as exc:
            if restore is not None:
                restore.put_back()
            raise ValueError(
                f"{name!r}: the model's own load code failed ({type(exc).__name__}: {exc}); the model, the EMA "
                "and the optimizer were left as they were"
            ) from exc
    return ckpt


@dataclass
class _Backup:
    """What ``load`` puts back when the model's own load code fails after the EMA and the optimizer were
    written: a copy of the model state and of the EMA state, and the optimizer's old state (by
    reference: ``Optimizer.load_state_dict`` replaces its state objects, it does not write into them)."""

    model: nn.Module
    model_state: dict[str, Any]
    ema: EMA | None
    ema_state: dict[str, Any] | None
    optimizer: torch.optim.Optimizer | None
    optimizer_state: dict[str, Any] | None

    @classmethod
    def of(cls, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer | None) -> _Backup:
        state = {
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in model.state_dict().items()
        }
        return cls(
            model,
            state,
            ema,
            None if ema is None else ema.state_dict(),
            optimizer,
            None if optimizer is None else optimizer.state_dict(),
        )

    def put_back(self) -> None:
        """Tensors are copied straight back (no load hooks run again); a module's non-tensor extra state
        is offered back to its ``set_extra_state``, whose own failure most likely left it unchanged."""
        live = self.model.state_dict()
        with torch.no_grad():
            for key, saved in self.model_state.items():
                target = live.get(key)
                if isinstance(target, Tensor) and isinstance(saved, Tensor):
                    target.copy_(saved)
                elif key.rsplit(".", 1)[-1] == "_extra_state":
                    owner = self.model.get_submodule(key.rpartition(".")[0])
                    with contextlib.suppress(Exception):
                        owner.set_extra_state(saved)
        if self.ema is not None and self.ema_state is not None:
            self.ema.load_state_dict(self.ema_state)
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)


def _runs_own_load_code(module: nn.Module) -> bool:
    """Whether ``module.load_state_dict`` may run code that can fail after our checks: load hooks,
    non-tensor extra state, or a ``_load_from_state_dict`` defined outside torch."""
    for sub in module.modules():
        kind = type(sub)
        if sub._load_state_dict_pre_hooks or sub._load_state_dict_post_hooks:
            return True
        if kind.set_extra_state is not nn.Module.set_extra_state:
            return True
        if not kind._load_from_state_dict.__module__.startswith("torch."):
            return True
    return False


def peer_state_for(ema: EMA, raw: Any, kind: str) -> dict[str, Any]:
    """A polyak state for ``ema`` holding the averaged weights of the peer checkpoint object ``raw``."""
    names = peers.param_names(ema.model, kind) if kind in peers.LIST_FORMATS else None
    return peers.to_polyak_state(raw, kind, template=ema.state_dict(), live=ema.model.state_dict(), param_names=names)


def _matching(model: nn.Module, state: Mapping[str, Any]) -> dict[str, str]:
    by_norm = {normalize_key(str(k)): str(k) for k in state}
    return {key: by_norm.get(normalize_key(key), "") for key in model.state_dict()}


def check_model_state(model: nn.Module, state: Mapping[str, Any], *, what: str) -> None:
    """Raise ValueError (listing keys) unless ``state`` fits ``model`` exactly: same keys (wrapper
    prefixes ignored), a tensor where the model has a tensor with the same shape, dtype and layout and
    finite values; where the model keeps non-tensor extra state (``get_extra_state``), the file's value
    is passed to the module as it is."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what}: corrupt model weights (expected a mapping, got {type(state).__name__})")
    own = model.state_dict()
    if any(map(is_dtensor, own.values())):
        raise ValueError(
            f"{what}: this model's weights are DTensors (FSDP2, tensor parallelism); polyak.load restores the EMA "
            "of a sharded model, but the model and optimizer sections only into unsharded ones. Load the model "
            "with torch.distributed.checkpoint (dcp.load with set_model_state_dict), or load this file into an "
            "unsharded model before sharding it"
        )
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
        if not isinstance(dst, Tensor):  # a module's extra state: whatever its set_extra_state takes
            continue
        if not isinstance(src, Tensor):
            raise ValueError(f"{what}: {src_key!r} is a {type(src).__name__}, not a tensor")
        if src.layout != dst.layout:
            raise ValueError(
                f"{what}: {key!r} is a {src.layout} tensor in the file and a {dst.layout} tensor in the model"
            )
        if src.shape != dst.shape:
            raise ValueError(
                f"{what}: shape mismatch for {key!r}: file has {tuple(src.shape)}, model has {tuple(dst.shape)}"
            )
        if src.dtype != dst.dtype:
            raise ValueError(
                f"{what}: dtype mismatch for {key!r}: file has {src.dtype}, model has {dst.dtype}; "
                f"convert the model first (model.to({src.dtype}))"
            )
        if src.layout == torch.strided and not finite_on_host([src]):
            raise ValueError(f"{what}: {key!r} holds NaN/inf; refusing to load corrupt weights")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], *, what: str) -> None:
    """Check that ``optimizer.load_state_dict(state)`` will succeed, without changing ``optimizer``.

    The structure is checked first (for clear messages), then the state is loaded into a shallow copy:
    ``Optimizer.load_state_dict`` builds new ``state`` and ``param_groups`` objects and rebinds them on
    the object it is called on, so the copy takes every change and the original none. Whatever it refuses
    (an SGD state loaded into AdamW raises ``KeyError: 'step'`` in Adam's ``__setstate__``) becomes a
    ValueError here, before anything was written.
    """
    if any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            f"{what}: this optimizer's parameters are DTensors (FSDP2, tensor parallelism), whose optimizer state "
            "is sharded too; load it with torch.distributed.checkpoint (dcp.load with set_optimizer_state_dict)"
        )
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), Mapping):
        raise ValueError(f"{what}: corrupt optimizer state (expected 'state' and 'param_groups')")
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        raise ValueError(
            f"{what}: the optimizer state has {len(groups)} parameter group(s), this optimizer has {len(ours)}; "
            "build the optimizer the same way as when saving"
        )
    ids: set[object] = set()
    for i, (saved, own) in enumerate(zip(groups, ours)):
        params = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(params, list):
            raise ValueError(f"{what}: corrupt optimizer state (parameter group {i} has no 'params' list)")
        if len(params) != len(own["params"]):
            raise ValueError(
                f"{what}: optimizer parameter group {i} holds {len(params)} parameters in the "
                f"file and {len(own['params'])} here; build the optimizer over the same parameters"
            )
        foreign = sorted(str(k) for k in saved if k not in own and k != "param_names")
        if foreign:
            raise ValueError(
                f"{what}: the optimizer state was saved by another kind of optimizer (its parameter groups hold "
                f"{foreign}, which {type(optimizer).__name__} does not have); build the same optimizer as when saving"
            )
        ids.update(params)
    for key, value in state["state"].items():
        if key not in ids or not isinstance(value, Mapping):
            raise ValueError(f"{what}: corrupt optimizer state (entry {key!r} names no parameter or is not a dict)")
    probe = copy.copy(optimizer)
    try:
        probe.load_state_dict(state)  # type: ignore[arg-type]
    except Exception as exc:
        raise ValueError(
            f"{what}: {type(optimizer).__name__} refuses the saved optimizer state ({type(exc).__name__}: {exc}); "
            "build the same optimizer as when saving"
        ) from None


def _load_model(model: nn.Module, state: Mapping[str, Any]) -> None:
    mapping = _matching(model, state)
    model.load_state_dict({key: state[src] for key, src in mapping.items()}, strict=True)
