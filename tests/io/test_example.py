"""The checkpoint example runs and finds the resumed run bit-identical."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "checkpoint_resume.py"


def test_checkpoint_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--dir", str(tmp_path)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "bit for bit: True" in capsys.readouterr().out
    assert (tmp_path / "run.safetensors").exists()
