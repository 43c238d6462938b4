"""A dependency-free progress line for the command line: ``label [#####-----] 3/10 4s`` on stderr.

It draws only when the stream is a terminal and the work has already taken ``delay`` seconds (1 s by
default), so short work, pipes, files, CI logs and ``--quiet`` runs stay silent. Each redraw starts with a
carriage return and overwrites the line; ``close()`` erases it (as rich's ``transient=True`` does), so
what the command prints afterwards starts on a clean line. The experiments that have the ``[experiments]``
extra use rich's bars instead; this is for the core install (post-hoc synthesis, conversions).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from polyak._validate import as_float, as_int

__all__ = ["Progress", "render"]

WIDTH = 24  # characters of the bar itself
DELAY = 1.0  # seconds of work before the line appears


def render(label: str, done: int, total: int, seconds: float, width: int = WIDTH) -> str:
    """The progress line (no carriage return): ``label [###---] done/total Ns``."""
    filled = width * min(done, total) // total if total > 0 else width
    return f"{label} [{'#' * filled}{'-' * (width - filled)}] {done}/{total} {seconds:.0f}s"


class Progress:
    """``with Progress(total, "reading snapshots", quiet=args.quiet) as bar: ... bar.advance()``.

    Silent when ``quiet``, when ``stream`` (default ``sys.stderr``) is not a TTY, and until ``delay``
    seconds (default ``DELAY``, 1 s) have passed; redrawn at most every ``interval`` seconds (and once more at the end).
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        delay: float | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = as_int(total, "total", minimum=0)
        self.label = label
        self.delay = DELAY if delay is None else as_float(delay, "delay")
        self.interval = as_float(interval, "interval")
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._start = clock()
        self._drawn_at: float | None = None  # when the line was last drawn; None: never
        self._width = 0  # characters on the line now
        isatty = getattr(self._stream, "isatty", None)
        self.enabled = not quiet and callable(isatty) and bool(isatty())

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units of work done, and redraw the line if it is due."""
        self.done += n
        if not self.enabled:
            return
        now = self._clock()
        if now - self._start < self.delay:
            return
        if self._drawn_at is not None and now - self._drawn_at < self.interval and self.done < self.total:
            return
        self._draw(render(self.label, self.done, self.total, now - self._start))
        self._drawn_at = now

    def close(self) -> None:
        """Erase the line if one was drawn."""
        if self._width:
            self._draw("")
            self._width = 0

    def _draw(self, line: str) -> None:
        pad = max(0, self._width - len(line))
        self._stream.write("\r" + line + " " * pad + ("\r" if not line else ""))
        self._stream.flush()
        self._width = len(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
