"""Streaming, atomic writers for the two file formats: nothing is built in memory first.

* safetensors: a header with a placeholder checksum, then each tensor in turn (a CUDA or non-contiguous
  tensor is copied to the host one at a time), then the header again with the real checksum (same
  length): the sha256 of the header as first written and of every tensor byte, so the reader
  (``_readers.read_safetensors``) catches an edit of either. Memory beyond the tensors themselves: one
  tensor's host copy at most.
* torch: ``torch.save`` writes straight into the atomic temporary file.

Both write through ``_atomic.atomic_writer`` (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from polyak._sharding import is_sharded
from polyak.io._atomic import ChunkedWriter, atomic_writer, write_chunked
from polyak.io._buffers import host_buffer
from polyak.io._readers import CHECKSUM_PREFIX, checksum_placeholder

# safetensors dtype names (https://github.com/huggingface/safetensors, "dtype" in the header)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class Layout:
    """A safetensors file before its bytes: the header (sha256 still a placeholder) and the tensors in
    file order."""

    header: dict[str, Any]
    tensors: list[Tensor]


def safetensors_layout(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Layout:
    """Order and place ``tensors`` as safetensors does: larger element sizes first (so each tensor starts
    at a multiple of its element size after the 8-byte-aligned header), then by name; offsets are
    relative to the end of the header. ``metadata`` gains ``payload_bytes`` and ``checksum``. Every error
    about the tensors is raised here, before a file is opened."""
    if sys.byteorder != "little":
        raise ValueError("safetensors stores little-endian bytes; on this big-endian host save with format='pt'")
    meta = dict(metadata)
    entries = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, tensor in entries:
        dtype = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(
                f"cannot store tensor {name!r} of dtype {tensor.dtype} in safetensors; convert it "
                "(e.g. .float()) or save with format='pt'"
            )
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise TypeError(f"cannot store tensor {name!r}: only dense tensors with data can be saved")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta["payload_bytes"] = str(offset)
    meta.pop("sha256", None)
    meta["checksum"] = checksum_placeholder()  # the real digest has the same length: rewritten in place
    return Layout(header, [t for _, t in entries])


def _encode_header(header: dict[str, Any]) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes in C order on the host: a view where it is already a contiguous CPU tensor,
    else one copy of this tensor only. A sharded tensor (a DTensor, a rank-sharded range) is gathered
    first (a collective, see ``save_safetensors_from_rank0``)."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return host_buffer(tensor.detach().to("cpu").contiguous())


def write_safetensors(
    handle: BinaryIO, layout: Layout, tensor_bytes: Callable[[Tensor], memoryview] = _tensor_bytes
) -> None:
    """Stream the tensors one at a time after a placeholder header, hashing header and tensors as they
    go, then write the header again with the real checksum."""
    placeholder = _encode_header(layout.header)
    handle.write(placeholder)
    digest = hashlib.sha256(placeholder)
    for tensor in layout.tensors:
        data = tensor_bytes(tensor)
        digest.update(data)
        write_chunked(handle, data)
    checksum = CHECKSUM_PREFIX + digest.hexdigest()
    header = {**layout.header, "__metadata__": {**layout.header["__metadata__"], "checksum": checksum}}
    final = _encode_header(header)
    if len(final) != len(placeholder):  # a hex sha256 has a fixed length; this guards the format
        raise RuntimeError("internal error: the safetensors header changed length when the sha256 was filled in")
    handle.seek(0)
    handle.write(final)


def save_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``{name: tensor}`` with ``metadata`` to ``path`` as safetensors, streamed and atomic."""
    layout = safetensors_layout(tensors, metadata)
    with atomic_writer(path) as handle:
        write_safetensors(handle, layout)
    return Path(path)


def save_safetensors_from_rank0(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *, rank0: bool
) -> Path:
    """``save_safetensors`` for tensors of which some are sharded (``_sharding.is_sharded``): a collective
    every rank must call. Every rank walks the tensors in file order and gathers each sharded one in turn; rank 0 streams them into
    the file, so it holds at most one full tensor beyond its shards."""
    layout = safetensors_layout(tensors, metadata)  # the same header (and errors) on every rank
    if not rank0:
        for tensor in layout.tensors:
            if is_sharded(tensor):
                tensor.full_tensor()  # type: ignore[attr-defined]
        return Path(path)
    read = 0

    def counted(tensor: Tensor) -> memoryview:
        nonlocal read
        if is_sharded(tensor):
            tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        read += 1  # this tensor's gather is done, whatever happens to its bytes
        return _tensor_bytes(tensor)

    try:
        with atomic_writer(path) as handle:
            write_safetensors(handle, layout, counted)
    except BaseException:
        # a failed write (full disk) on rank 0: still take part in the remaining gathers, so that the
        # other ranks finish instead of waiting for rank 0 forever; then raise here
        for tensor in layout.tensors[read:]:
            if is_sharded(tensor):
                tensor.full_tensor()  # type: ignore[attr-defined]
        raise
    return Path(path)


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` straight into an atomic temporary file. A failed write (e.g. ``ENOSPC``) is
    raised as itself, not as the RuntimeError torch's zip writer turns it into."""
    with atomic_writer(path) as handle:
        writer = ChunkedWriter(handle)
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]  # a file-like object with write()
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
    return Path(path)
