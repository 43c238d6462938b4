"""``polyak extract`` / ``convert`` draw a progress line (read, average, write) only on a terminal,
only when the work takes long enough (``_progress.DELAY``), and never with ``--quiet``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

import polyak
from polyak import _progress
from polyak.cli import main

from .conftest import make_model


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = make_model(0)
    ema = polyak.EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    return polyak.save(tmp_path / "run.safetensors", ema, model=model)


@pytest.mark.parametrize("command", ["extract", "convert"])
def test_progress_line(
    command: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [command, str(ckpt), "-o", str(tmp_path / "out.safetensors")]
    if command == "convert":
        argv += ["--to", "timm"]
    # small and fast: silent on a terminal too
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(argv) == 0
    assert tty.getvalue() == ""
    # the same work counted as long: every section drawn in place, then erased
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(argv) == 0
    drawn = tty.getvalue()
    assert drawn.startswith(f"\r{command}: averaging [")
    assert " 1/3 " in drawn
    assert f"\r{command}: writing [{'#' * _progress.WIDTH}] 3/3 " in drawn
    assert drawn.endswith("\r")
    assert "\n" not in drawn
    # --quiet on a terminal, and a pipe without --quiet: silent
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main([*argv, "--quiet"]) == 0
    assert tty.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(argv) == 0
    assert sys.stderr.getvalue() == ""  # type: ignore[attr-defined]
    assert "wrote" in capsys.readouterr().out
