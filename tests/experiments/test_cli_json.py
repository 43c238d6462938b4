"""``polyak experiment --json`` and ``polyak demo --json``: one JSON object on stdout, for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyak.cli import main

pytest.importorskip("sklearn")


def test_experiment_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reg"
    argv = ["experiment", "regression", "--seeds", "2", "--epochs", "2", "--samples", "60", "--decay", "0.9"]
    assert main([*argv, "--out", str(out), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["experiment"] == "regression"
    assert summary["report"] == str(out / "report.md")
    assert Path(summary["results"]).is_file()
    assert summary["seconds"] > 0
    # the statistics are the ones results.json holds
    stored = json.loads((out / "results.json").read_text())
    assert set(summary["analysis"]) == set(stored["arms"])
    assert isinstance(summary["claims"], list)


def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--seeds", "2", "--epochs", "2", "--samples", "60", "--out", str(tmp_path), "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report"] == str(tmp_path / "report.md")
    assert set(summary["experiments"]) == {"regression", "digits", "swissroll"}
    assert Path(summary["experiments"]["digits"]["results"]).is_file()


def test_posthoc_experiment_refuses_json_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "posthoc", "--out", str(tmp_path / "p"), "--json"]) == 2
    assert "--json is not available for the posthoc experiment" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
