"""``polyak posthoc DIR --sigma-rel S -o out.safetensors --plot p.png``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyak import _progress
from polyak.cli import main
from polyak.posthoc import PostHocEMA
from tests.posthoc.helpers import model, random_walk, set_weights


def _run(directory: Path) -> PostHocEMA:
    net = model()
    ph = PostHocEMA(net, snapshot_every=20, directory=directory, update_every=2)
    for theta in random_walk(100):
        set_weights(net, theta)
        ph.update()
    return ph


def test_cli_writes_the_synthesis_and_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ph = _run(tmp_path / "run")
    out, png = tmp_path / "m.safetensors", tmp_path / "p.png"
    code = main(["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.07", "-o", str(out), "--plot", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "relative profile error" in text
    assert f"{ph.weights(0.07).error:.2e}" in text
    got = load_file(out)
    want = ph.synthesize(0.07)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path / "run")
    assert main(["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.07", "--at", "50"]) == 2
    assert "not a snapshot step" in capsys.readouterr().err
    assert main(["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.07", "-o", str(tmp_path / "m.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.07"]) == 2
    assert "not a polyak.PostHocEMA snapshot directory" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_progress_only_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ph = _run(tmp_path / "run")
    used = len({s for s, c in zip(ph.weights(0.07).steps, ph.weights(0.07).coefficients) if c != 0.0})
    argv = ["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.07", "-o", str(tmp_path / "m.safetensors")]
    monkeypatch.setattr(_progress, "DELAY", 0.0)  # draw at once, however fast the machine
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal: silent
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(argv) == 0
    drawn = tty.getvalue()
    assert f"\rreading snapshots [{'#' * _progress.WIDTH}] {used}/{used} " in drawn
    assert drawn.endswith("\r")  # the line is erased at the end
    assert "\n" not in drawn
    quiet = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main([*argv, "--quiet"]) == 0
    assert quiet.getvalue() == ""
