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


def test_posthoc_experiment_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    argv = ["experiment", "posthoc", "--seeds", "2", "--epochs", "2", "--samples", "60", "--out", str(out)]
    assert main([*argv, "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet, and stderr is not a terminal anyway
    summary = json.loads(captured.out)
    assert summary["experiment"] == "posthoc"
    assert summary["report"] == str(out / "report.md")
    assert Path(summary["results"]).is_file()
    assert summary["seconds"] > 0
    analysis = summary["analysis"]
    assert analysis["metric"] == "MSE"
    assert list(analysis["widths"]) == ["0.02", "0.03", "0.05", "0.07", "0.1", "0.15", "0.2"]
    # the summary holds the means of the per-seed numbers results.json stores
    seeds = json.loads((out / "results.json").read_text())["seeds"]
    for key, row in analysis["widths"].items():
        exact = [s["widths"][key]["exact"]["test"] for s in seeds]
        post = [s["widths"][key]["posthoc"]["test"] for s in seeds]
        assert row["exact"] == pytest.approx(sum(exact) / 2)
        assert row["posthoc"] == pytest.approx(sum(post) / 2)
        assert row["difference"] == pytest.approx(sum(post) / 2 - sum(exact) / 2, abs=1e-12)
        lo, hi = row["ci95"]
        assert lo <= row["difference"] <= hi
    for key in ("0.05", "0.1"):  # stored widths: synthesised exactly
        assert analysis["widths"][key]["weights_rel_l2"] == 0.0
    assert analysis["raw"] == pytest.approx(sum(s["raw"]["test"] for s in seeds) / 2)
    assert set(analysis["best_width"]) == {"exact", "posthoc"}
