"""Split a nested checkpoint (dicts, lists, tuples, numbers, strings, tensors) into flat named tensors
and a JSON skeleton, and join them back exactly.

safetensors stores only flat ``{name: tensor}`` plus ``{str: str}`` metadata, so every non-tensor value
goes into a JSON skeleton in which a tensor is ``{"__tensor__": name}``. Dicts are stored as a list of
``[key, value]`` pairs so that int keys (optimizer state) and key order survive; tuples are tagged.
Python floats survive JSON exactly (shortest repr round-trips), NaN/inf included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polyak._sharding import is_sharded

_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"
_KEY_TYPES = (str, int, float, bool, type(None))


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def same_tensor_key(tensor: Tensor) -> tuple[Any, ...]:
    """Equal for two names of one stored tensor: same storage, offset, shape, strides and dtype."""
    return (
        tensor.untyped_storage().data_ptr(),
        int(tensor.storage_offset()),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def flatten(tree: Any, prefix: str, *, share: bool = True) -> tuple[Any, dict[str, Tensor]]:
    """Return ``(skeleton, tensors)``; tensor names are dotted paths under ``prefix``.

    A tensor met twice (tied weights) is stored once and both paths refer to it (``share``), so it reads
    back as one tensor, as ``torch.save`` keeps sharing; ``share=False`` stores a copy under each path
    (for plain ``{key: tensor}`` files, which need every key).
    """
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}

    def name_for(path: str) -> str:
        name, n = path, 1
        while name in tensors:
            n += 1
            name = f"{path}#{n}"
        return name

    def walk(node: Any, path: str) -> Any:
        if is_sharded(node):  # a sharded tensor: stored whole, gathered when written (_writers)
            ident = ("dtensor", id(node))
            if share and ident in seen:
                return {_TENSOR: seen[ident]}
            seen[ident] = name = name_for(path)
            tensors[name] = node.detach()
            return {_TENSOR: name}
        if isinstance(node, Tensor):
            t = node.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            ident = same_tensor_key(t)
            if t.numel() and ident in seen:
                if share:
                    return {_TENSOR: seen[ident]}
                t = t.clone()
                ident = same_tensor_key(t)
            if t.numel():
                seen[ident] = name_for(path)
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger storage
            name = seen[ident] if t.numel() else name_for(path)
            tensors[name] = t
            return {_TENSOR: name}
        if isinstance(node, bool) or node is None or isinstance(node, (int, float, str)):
            return node
        if isinstance(node, dict):
            items = []
            for key, value in node.items():
                if not isinstance(key, _KEY_TYPES):
                    raise TypeError(f"cannot store key {key!r} at {path!r}: keys must be str, int, float, bool or None")
                items.append([key, walk(value, _join(path, key))])
            return {_DICT: items}
        if isinstance(node, tuple):
            return {_TUPLE: [walk(v, _join(path, i)) for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, _join(path, i)) for i, v in enumerate(node)]
        if isinstance(node, torch.dtype):
            return {"__dtype__": str(node).removeprefix("torch.")}
        raise TypeError(
            f"cannot store {type(node).__name__} at {path!r} in a safetensors checkpoint: only tensors, numbers, "
            "strings, None, lists, tuples and dicts; convert it, or save with format='pt'"
        )

    return walk(tree, prefix), tensors


def unflatten(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten`. Raises ValueError naming what is wrong in a damaged or crafted skeleton
    (a tensor the file lacks, a malformed node, an unknown dtype); the caller turns a RecursionError
    from an absurdly deep one into a ValueError too."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if len(skeleton) != 1:
            raise ValueError(f"corrupt checkpoint metadata: unknown node {sorted(skeleton)[:5]!r}")
        ((tag, value),) = skeleton.items()
        if tag == _TENSOR:
            if not isinstance(value, str) or value not in tensors:
                raise ValueError(f"corrupt checkpoint: tensor {value!r} is referenced by the metadata but missing")
            return tensors[value]
        if tag == _DICT:
            if not isinstance(value, list) or not all(
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], _KEY_TYPES) for item in value
            ):
                raise ValueError("corrupt checkpoint metadata: a dict node must be a list of [key, value] pairs")
            return {key: unflatten(item, tensors) for key, item in value}
        if tag == _TUPLE:
            if not isinstance(value, list):
                raise ValueError("corrupt checkpoint metadata: a tuple node must hold a list")
            return tuple(unflatten(v, tensors) for v in value)
        if tag == "__dtype__":
            dtype = getattr(torch, value, None) if isinstance(value, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"corrupt checkpoint metadata: {value!r} is not a torch dtype")
            return dtype
        raise ValueError(f"corrupt checkpoint metadata: unknown node {tag!r}")
    if skeleton is None or isinstance(skeleton, (bool, int, float, str)):
        return skeleton
    raise ValueError(f"corrupt checkpoint metadata: unexpected {type(skeleton).__name__}")
