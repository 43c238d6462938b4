"""``polyak experiment posthoc``: a tiny run writes a report in which the stored widths match exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyak.cli import main


def test_posthoc_experiment_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "report"
    args = ["experiment", "posthoc", "--seeds", "2", "--epochs", "3", "--samples", "200", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert len(data["seeds"]) == 2
    for seed in data["seeds"]:
        for key in ("0.05", "0.1"):  # stored widths: the snapshot is the exact EMA trained alongside
            assert seed["widths"][key]["weights_rel_l2"] == 0.0
            assert seed["widths"][key]["posthoc"] == seed["widths"][key]["exact"]
        for row in seed["widths"].values():
            assert row["weights_rel_l2"] < 1e-5
    text = (out / "report.md").read_text()
    assert "| 0.07 |" in text
    assert "Best width on validation" in text
