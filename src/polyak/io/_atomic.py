"""Atomic file writes: a crash, a kill or a full disk mid-write leaves the previous file intact.

Recipe (the one SQLite and git use): write a temporary file in the destination's directory, flush and
``fsync`` it, ``os.replace`` it over the destination (atomic on POSIX and Windows), then ``fsync`` the
directory so the rename itself survives a power cut. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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


def write_chunked(handle: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` in ``CHUNK_BYTES`` pieces (bounded syscall size; the tests inject failures here)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK_BYTES):
        _write_chunk(handle, view[start : start + CHUNK_BYTES])


class ChunkedWriter:
    """A write-only file object over ``handle`` that writes through ``write_chunked`` (for ``torch.save``).

    ``error`` keeps the first failed write: torch's zip writer reports it as its own RuntimeError (or a
    second one while closing the archive), so the caller re-raises this one, e.g. ``ENOSPC``.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            write_chunked(self._handle, data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        self._handle.flush()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary handle (readable and seekable) on a temporary file beside ``path``; on a clean exit
    flush, ``fsync`` and rename it over ``path``, then ``fsync`` the directory. On any error (a failed
    write such as ``ENOSPC``, an exception in the body, a KeyboardInterrupt) the temporary file is
    removed and the previous ``path`` is left untouched."""
    target = check_writable_destination(path)
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield handle
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
