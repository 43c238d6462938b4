"""Atomic file writes: a crash, a kill or a full disk mid-write leaves the previous file intact.

Recipe (the one SQLite and git use): write a temporary file in the destination's directory, flush and
``fsync`` it, ``os.replace`` it over the destination (atomic on POSIX and Windows), then ``fsync`` the
directory so the rename itself survives a power cut. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 24  # 16 MiB per write call


def check_writable_destination(path: str | os.PathLike[str]) -> Path:
    """Validate ``path`` before any serialisation work: not a directory, parent exists and is writable."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot save to {str(target)!r}: it is a directory; pass a file path")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot save to {str(target)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {str(target)!r}: directory {str(parent)!r} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(f"cannot save to {str(target)!r}: the existing file is not writable")
    return target


def _write_chunk(handle: BinaryIO, chunk: memoryview) -> None:
    handle.write(chunk)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview | Sequence[bytes | memoryview]) -> Path:
    """Write ``data`` (bytes, or a sequence of parts written one after the other) to ``path`` atomically;
    returns the path. Raises the OSError of a failed write (e.g. ``ENOSPC``) after removing the temporary
    file; the previous ``path`` is left untouched."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    target = check_writable_destination(path)
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), CHUNK_BYTES):
                    _write_chunk(handle, view[start : start + CHUNK_BYTES])
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():  # keep the previous file's permission bits
            with contextlib.suppress(OSError):
                os.chmod(tmp_name, target.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(parent)
    return target


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
