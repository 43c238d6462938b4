"""The dependency-free progress line: silent off a terminal, under ``quiet`` and for short work; drawn
with carriage returns and erased at the end on a (fake) terminal."""

from __future__ import annotations

import io

import pytest

from polyak._progress import Progress, render


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_render_closed_form() -> None:
    assert render("read", 3, 12, 4.4, width=8) == "read [##------] 3/12 4s"
    assert render("read", 12, 12, 0.0, width=4) == "read [####] 12/12 0s"
    assert render("read", 0, 0, 0.0, width=4) == "read [####] 0/0 0s"  # nothing to do is done


def test_quiet_when_not_a_tty() -> None:
    stream, clock = io.StringIO(), Clock()
    with Progress(5, "x", stream=stream, clock=clock) as bar:
        for _ in range(5):
            clock.now += 10.0
            bar.advance()
    assert not bar.enabled
    assert stream.getvalue() == ""


def test_quiet_flag_silences_a_tty() -> None:
    stream, clock = FakeTTY(), Clock()
    with Progress(5, "x", stream=stream, clock=clock, quiet=True) as bar:
        clock.now += 10.0
        bar.advance()
    assert stream.getvalue() == ""


def test_silent_when_the_work_is_short() -> None:
    stream, clock = FakeTTY(), Clock()
    with Progress(5, "x", stream=stream, clock=clock, delay=1.0) as bar:
        for _ in range(5):
            clock.now += 0.1  # 0.5 s in all
            bar.advance()
    assert bar.enabled
    assert bar.done == 5
    assert stream.getvalue() == ""


def test_tty_rendering_redraws_in_place_and_erases() -> None:
    stream, clock = FakeTTY(), Clock()
    with Progress(4, "snapshots", stream=stream, clock=clock, delay=1.0, interval=0.5) as bar:
        clock.now = 0.5
        bar.advance()  # before the delay: nothing
        clock.now = 1.0
        bar.advance()  # 2/4 drawn
        clock.now = 1.2
        bar.advance()  # within the interval and not finished: skipped
        clock.now = 1.3
        bar.advance()  # finished: drawn even within the interval
    out = stream.getvalue()
    first = render("snapshots", 2, 4, 1.0)
    last = render("snapshots", 4, 4, 1.3)
    assert out == "\r" + first + "\r" + last + "\r" + " " * len(last) + "\r"
    assert "\n" not in out


def test_stream_without_isatty_is_quiet() -> None:
    class Sink:
        def write(self, s: str) -> int:
            raise AssertionError("wrote to a stream that is not a terminal")

        def flush(self) -> None:
            pass

    with Progress(1, "x", stream=Sink(), clock=lambda: 100.0) as bar:  # type: ignore[arg-type]
        bar.advance()


def test_bad_total_is_refused() -> None:
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")
    with pytest.raises(TypeError, match="total"):
        Progress(True, "x")
