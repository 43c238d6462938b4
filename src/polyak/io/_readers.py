"""Read a checkpoint file from one open handle, checking everything a crafted or damaged file could
break before it is believed.

* safetensors: the header is parsed and checked (JSON depth, every dtype, shape and offset; the tensors
  tile the data exactly), then each tensor is read into its own buffer, hashed as it arrives. The
  ``checksum`` in polyak's metadata is the sha256 of the 8-byte length, the header (with the checksum's
  own hex digits read as zeros) and the data, so an edit of the header (a dtype, an offset, an
  optimizer's ``lr``) fails it like a flipped data byte does. Files written before polyak hashed the
  header carry ``sha256`` over the data alone, and are checked that way.
* torch: ``torch.save`` writes a zip archive of stored (uncompressed) records, each with a CRC-32. The
  archive's directory is checked first (no record larger than the file itself, so a crafted record
  cannot make us allocate more than the file's size), then every CRC, then ``torch.load`` reads the
  same handle (``weights_only=True`` unless trusted).

One handle means one file: a trainer that atomically replaces the checkpoint while it is read cannot mix
the metadata of one version with the tensors of the next.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polyak.io._buffers import host_buffer

__all__ = ["CHECKSUM_PREFIX", "SafetensorsFile", "checksum_placeholder", "read_safetensors", "read_torch"]

MAX_HEADER_BYTES = 100_000_000
CHECKSUM_PREFIX = "sha256:"
_CHECKSUM_FIELD = re.compile(rb'"checksum":"sha256:([0-9a-f]{64})"')
_CHUNK = 1 << 24

# safetensors dtype names -> torch (https://github.com/huggingface/safetensors, "dtype" in the header)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def checksum_placeholder() -> str:
    """The value a writer puts in ``checksum`` before the digest is known (same length as a real one)."""
    return CHECKSUM_PREFIX + "0" * 64


@dataclass(frozen=True)
class SafetensorsFile:
    metadata: dict[str, str]
    tensors: dict[str, Tensor]


def _fail(name: str, detail: str) -> ValueError:
    return ValueError(f"{name!r} {detail}")


def _load_json(data: bytes, name: str, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise _fail(name, f"is corrupt: its {what} nests too deeply to be a checkpoint") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(name, f"is not a safetensors or torch checkpoint ({what} is not JSON: {exc})") from None


def load_json(data: str | bytes, name: str, what: str) -> Any:
    """``json.loads`` with every failure (including excessive nesting) a ValueError naming the file."""
    return _load_json(data.encode() if isinstance(data, str) else data, name, what)


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entries(header: dict[str, Any], name: str, data_len: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(tensor name, dtype, shape, begin, end) in file order; every field checked; the tensors must tile
    ``[0, data_len)`` with no gap and no overlap (as safetensors' own reader requires)."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(name, f"is not a valid safetensors file: tensor {key!r} has a malformed header entry")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise _fail(name, f"is not a valid safetensors file: tensor {key!r} has unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_nonneg_int(n) for n in shape):
            raise _fail(name, f"is not a valid safetensors file: tensor {key!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(n) for n in offsets)):
            raise _fail(name, f"is not a valid safetensors file: tensor {key!r} has malformed offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize:
            raise _fail(
                name,
                f"is not a valid safetensors file: tensor {key!r} ({info['dtype']} {shape}) needs "
                f"{numel * dtype.itemsize} bytes but its offsets span {end - begin}",
            )
        entries.append((key, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for key, _, _, begin, end in entries:
        if begin != position:
            raise _fail(name, f"is not a valid safetensors file: tensor {key!r} does not start where the previous ends")
        position = end
    if position > data_len:
        raise _fail(
            name,
            f"is truncated: {data_len} bytes of tensor data, the header declares {position}; the write was "
            "interrupted, restore it from a previous copy",
        )
    if position < data_len:
        raise _fail(name, f"is not a valid safetensors file: {data_len - position} bytes after the last tensor")
    return entries


def _map(handle: io.BufferedReader, size: int) -> memoryview | None:
    """A private copy-on-write map of the open file: the tensors share the page cache (nothing is copied
    until written; safetensors' own loader does the same) and keep the very file they came from even if
    it is replaced meanwhile. None where the file system cannot map files."""
    try:
        return memoryview(mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY))
    except (OSError, ValueError):
        return None


def _tensor_at(
    view: memoryview | None, handle: io.BufferedReader, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]
) -> Tensor | None:
    """The tensor stored at ``offset`` (from the map, or read into a fresh tensor); None if the file ends."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if view is not None:
        if offset + nbytes > len(view):
            return None
        tensor = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % dtype.itemsize:  # a file from another writer that did not align its tensors
            tensor = tensor.clone()
        return tensor.view(dtype).reshape(shape)
    tensor = torch.empty(shape, dtype=dtype)
    handle.seek(offset)
    return tensor if handle.readinto(host_buffer(tensor)) == nbytes else None


def read_safetensors(handle: io.BufferedReader, name: str, size: int) -> SafetensorsFile:
    """Parse, check and load a safetensors file from ``handle`` (at offset 0) of ``size`` bytes."""
    if sys.byteorder != "little":
        raise ValueError("safetensors stores little-endian bytes; this big-endian host cannot read it")
    first = handle.read(8)
    if len(first) < 8:
        raise _fail(name, f"is truncated or not a checkpoint: only {size} bytes")
    header_len = int.from_bytes(first, "little")
    if header_len > MAX_HEADER_BYTES:
        raise _fail(name, "is not a safetensors or torch checkpoint (unrecognised first bytes)")
    if 8 + header_len > size:
        raise _fail(
            name,
            f"is truncated: the safetensors header needs {header_len} bytes but the file ends after {size - 8}; "
            "the write was interrupted, restore it from a previous copy",
        )
    raw = handle.read(header_len)
    header = _load_json(raw, name, "header")
    if not isinstance(header, dict):
        raise _fail(name, "is not a safetensors checkpoint (header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(name, "is not a valid safetensors file: '__metadata__' must map strings to strings")
    data_len = size - 8 - header_len
    declared = meta.get("payload_bytes")
    if declared is not None and (not declared.isdecimal() or int(declared) > data_len):
        raise _fail(
            name,
            f"is truncated: {data_len} bytes of tensor data, the header declares {declared}; the write was "
            "interrupted, restore it from a previous copy",
        )
    entries = _entries(header, name, data_len)

    digest = hashlib.sha256()
    expected: str | None = None
    if "checksum" in meta:
        found = _CHECKSUM_FIELD.findall(raw)
        if len(found) != 1 or meta["checksum"] != CHECKSUM_PREFIX + found[0].decode():
            raise _fail(name, f"is corrupt: its sha256 checksum field is malformed ({meta['checksum']!r})")
        expected = found[0].decode()
        digest.update(first)
        digest.update(_CHECKSUM_FIELD.sub(b'"checksum":"' + checksum_placeholder().encode() + b'"', raw))
    elif "sha256" in meta:  # files written before the header was hashed: the data only
        expected = meta["sha256"]
    start = 8 + header_len
    view = _map(handle, size)
    if expected is not None:
        for part in range(start, size, _CHUNK):
            digest.update(view[part : part + _CHUNK] if view is not None else handle.read(_CHUNK))
    tensors: dict[str, Tensor] = {}
    for key, dtype, shape, begin, end in entries:
        tensor = _tensor_at(view, handle, start + begin, end - begin, dtype, shape)
        if tensor is None:
            raise _fail(name, "is truncated: it ended while its tensors were read")
        tensors[key] = tensor
    if expected is not None and digest.hexdigest() != expected:
        raise _fail(
            name,
            "is corrupt: the sha256 of its header and tensor data does not match the one saved with it "
            "(the file was damaged or edited after it was written)",
        )
    return SafetensorsFile(metadata=dict(meta), tensors=tensors)


def _check_archive(handle: io.BufferedReader, name: str, size: int) -> None:
    """A torch zip archive: no record may declare more bytes than the file holds, every CRC-32 matches."""
    try:
        with zipfile.ZipFile(handle) as archive:
            for info in archive.infolist():
                if info.file_size > size or info.compress_type != zipfile.ZIP_STORED:
                    raise _fail(
                        name,
                        f"is not a checkpoint torch.save wrote: record {info.filename!r} declares "
                        f"{info.file_size} bytes (compressed), more than the file's {size}; refusing to inflate it",
                    )
            bad = archive.testzip()
    except ValueError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise _fail(name, f"is truncated or corrupt: its zip archive cannot be read ({exc})") from None
    if bad is not None:
        raise _fail(
            name, f"is corrupt: record {bad!r} fails its CRC-32 check (the file was damaged after it was written)"
        )


def read_torch(handle: io.BufferedReader, name: str, size: int, *, trust_pickle: bool) -> Any:
    """``torch.load`` from ``handle`` after checking a zip archive's records and CRCs; every failure is a
    ValueError naming the file (a refused pickle says how to trust it)."""
    head = handle.read(4)
    handle.seek(0)
    if head == b"PK\x03\x04":
        _check_archive(handle, name, size)
        handle.seek(0)
    try:
        return torch.load(handle, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise _fail(name, f"is truncated or corrupt: torch could not read it ({_first_line(exc)})") from None
        raise ValueError(
            f"refusing to unpickle {name!r}: it holds objects other than tensors and plain containers, and "
            f"unpickling them could run arbitrary code ({_first_line(exc)}). If you made this file yourself and "
            "trust it, pass trust_pickle=True (UNSAFE for files from others)"
        ) from None
    except RecursionError:
        raise _fail(name, "is corrupt: it nests too deeply to be a checkpoint") from None
    except MemoryError:
        raise _fail(name, "is corrupt: reading it would need more memory than this machine has") from None
    except Exception as exc:  # torch raises RuntimeError, OSError, UnicodeDecodeError, ... on damaged files
        raise _fail(name, f"is truncated or corrupt: torch could not read it ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
