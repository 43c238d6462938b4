"""Which of a model's tensors are averaged: key normalisation, include/exclude patterns, buffer policy."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.parameter import is_lazy

BufferPolicy = Literal["average", "copy", "skip"]
BUFFER_POLICIES: tuple[str, ...] = ("average", "copy", "skip")
Pattern = str | re.Pattern[str]

# Wrappers that prefix every key: DataParallel/DistributedDataParallel ("module.") and torch.compile
# ("_orig_mod."). Stripping them lets an average saved from a wrapped model load into a plain one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def normalize_key(key: str) -> str:
    """Strip leading ``module.``/``_orig_mod.`` prefixes and inner ``._orig_mod`` segments."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key.replace("._orig_mod.", ".")


def averageable(t: torch.Tensor) -> bool:
    """Floating and complex tensors are averaged; integer and bool tensors are only ever copied."""
    return t.is_floating_point() or t.is_complex()


def _as_patterns(value: Pattern | Iterable[Pattern] | None, what: str) -> tuple[Pattern, ...] | None:
    if value is None:
        return None
    items: Sequence[object]
    if isinstance(value, (str, re.Pattern)):
        items = [value]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"{what} takes names, glob patterns or compiled regexes, got {type(value).__name__} {value!r}")
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise TypeError(
                f"{what} takes names, glob patterns or compiled regexes, got {type(item).__name__} {item!r}"
            )
    return tuple(items)  # type: ignore[arg-type]


def matches(key: str, pattern: Pattern) -> bool:
    """A string matches the key exactly, as a glob (``*.bias``), or as a module prefix (``backbone``
    matches ``backbone.layer1.weight``); a compiled regex matches with ``re.search``."""
    if isinstance(pattern, re.Pattern):
        return pattern.search(key) is not None
    return key == pattern or key.startswith(pattern + ".") or fnmatch.fnmatchcase(key, pattern)


@dataclass(frozen=True)
class Selected:
    """One tensor of the model's state and what the average does with it.

    ``mode`` is ``"average"`` (a shadow is kept), ``"live"`` (the averaged model uses the live value:
    excluded parameters, integer buffers, buffers under ``"copy"``) or ``"skip"`` (left alone: buffers
    under ``"skip"``).
    """

    key: str  # normalised key
    model_keys: tuple[str, ...]  # the model's own state_dict keys (several when a tensor is tied)
    tensor: torch.Tensor  # the live parameter or buffer
    is_buffer: bool
    mode: Literal["average", "live", "skip"]
    shape: tuple[int, ...]  # at selection time: a later `param.data = ...` of another shape is detected


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        non_persistent: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module._buffers.items():
            if buf is None or name in non_persistent:
                continue
            out.append((f"{module_name}.{name}" if module_name else name, buf))
    return out


def refuse_unsupported(key: str, tensor: torch.Tensor, is_buffer: bool) -> None:
    """A clear error for a tensor that holds no data to average or copy: an uninitialised lazy
    parameter (``nn.LazyLinear`` before its first forward) or a meta tensor (``torch.device("meta")``,
    ``init_empty_weights``). Sparse tensors are refused where they would be averaged (``select``)."""
    what = "buffer" if is_buffer else "parameter"
    if is_lazy(tensor):
        raise ValueError(
            f"{what} {key!r} is an uninitialised lazy {what} (e.g. nn.LazyLinear before its first forward "
            "pass), so it has no shape yet; run one forward pass with a sample batch before building the EMA"
        )
    if tensor.is_meta:
        raise ValueError(
            f"{what} {key!r} is on the meta device (it has a shape but no data, e.g. built under "
            "torch.device('meta') or init_empty_weights); materialise the model first (model.to_empty("
            "device=...) and load or initialise the weights), then build the EMA"
        )


def select(
    model: nn.Module,
    *,
    include: Pattern | Iterable[Pattern] | None,
    exclude: Pattern | Iterable[Pattern] | None,
    buffers: str,
) -> list[Selected]:
    """Walk the model's parameters and persistent buffers once and decide each one's mode."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")

    # Group every state key by tensor identity, so tied weights get one shadow and all their keys.
    entries: dict[int, tuple[list[str], torch.Tensor, bool]] = {}
    raw: list[tuple[str, torch.Tensor, bool]] = [
        (k, p, False) for k, p in model.named_parameters(remove_duplicate=False)
    ]
    raw += [(k, b, True) for k, b in _persistent_buffers(model)]
    for model_key, tensor, is_buffer in raw:
        slot = entries.setdefault(id(tensor), ([], tensor, is_buffer))
        slot[0].append(model_key)
    for model_keys, tensor, is_buffer in entries.values():
        refuse_unsupported(model_keys[0], tensor, is_buffer)

    selected: list[Selected] = []
    seen: dict[str, str] = {}
    used_inc: set[int] = set()
    used_exc: set[int] = set()
    for model_keys, tensor, is_buffer in entries.values():
        key = normalize_key(model_keys[0])
        if key in seen:
            raise ValueError(
                f"model keys {seen[key]!r} and {model_keys[0]!r} both normalise to {key!r} after "
                "stripping the 'module.'/'_orig_mod.' wrapper prefixes; rename the submodule"
            )
        seen[key] = model_keys[0]
        mode: Literal["average", "live", "skip"] = "average"
        if is_buffer and buffers == "skip":
            mode = "skip"
        elif (is_buffer and buffers == "copy") or not averageable(tensor):
            mode = "live"
        else:
            keys = [normalize_key(k) for k in model_keys]
            if inc is not None:
                hits = [i for i, p in enumerate(inc) if any(matches(k, p) for k in keys)]
                used_inc.update(hits)
                if not hits:
                    mode = "live"
            if exc is not None:
                hits = [i for i, p in enumerate(exc) if any(matches(k, p) for k in keys)]
                used_exc.update(hits)
                if hits:
                    mode = "live"
        if mode == "average" and tensor.layout != torch.strided:
            raise ValueError(
                f"{'buffer' if is_buffer else 'parameter'} {model_keys[0]!r} is a sparse tensor ({tensor.layout}); "
                f"polyak averages dense tensors: leave it out with exclude={key!r} (the averaged model then "
                "uses its live value) or make it dense"
            )
        selected.append(Selected(key, tuple(model_keys), tensor, is_buffer, mode, tuple(tensor.shape)))

    for what, patterns, used in (("include", inc, used_inc), ("exclude", exc, used_exc)):
        if patterns is None:
            continue
        unused = [p.pattern if isinstance(p, re.Pattern) else p for i, p in enumerate(patterns) if i not in used]
        if unused:
            sample = ", ".join(s.key for s in selected[:5])
            raise ValueError(
                f"{what} pattern(s) {unused} matched no floating parameter or buffer; keys look like: {sample}"
            )
    if not any(s.mode == "average" and not s.is_buffer for s in selected):
        if not any(averageable(s.tensor) for s in selected if not s.is_buffer):
            raise ValueError(
                "the model has no floating-point parameters to average; "
                "EMA needs a model with at least one float/complex parameter"
            )
        raise ValueError("include/exclude left no parameter to average; loosen the patterns")
    return selected


def copy_pairs(
    ours: Sequence[Selected], targets: Sequence[Selected], averaged: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target tensor, value) for ``EMA.copy_to``: the average where there is one, else the live value;
    ``buffers="skip"`` tensors are left alone. Raises a ValueError, before anything is written, when the
    target's keys or shapes differ from the averaged model's."""
    mine = {s.key: s for s in ours}
    theirs = {s.key: s for s in targets}
    skipped = {k for k, s in mine.items() if s.mode == "skip"}
    missing = sorted(set(mine) - set(theirs) - skipped)
    unexpected = sorted(set(theirs) - set(mine))
    if missing or unexpected:
        raise ValueError(
            "copy_to: the target model does not match the averaged model: "
            f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}; pass a model of the same "
            "architecture"
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, dst in theirs.items():
        if key in skipped:
            continue
        src = averaged[key] if key in averaged else mine[key].tensor
        if dst.tensor.shape != src.shape:
            raise ValueError(
                f"copy_to: shape mismatch for {key!r}: averaged {tuple(src.shape)} vs target {tuple(dst.tensor.shape)}"
            )
        pairs.append((dst.tensor, src))
    return pairs
