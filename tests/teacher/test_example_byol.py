"""examples/byol_teacher.py runs end to end (two short epochs) with one teacher update per optimizer step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "byol_teacher.py"


def test_byol_example_runs_with_one_update_per_optimizer_step(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("byol_teacher_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--epochs", "2", "--accumulate", "4"])
    assert summary["teacher_updates"] == summary["optimizer_steps"] == 2 * (1797 // 128)
    for key in ("probe_teacher", "probe_online", "probe_untrained"):
        assert 0.0 <= summary[key] <= 1.0
    assert "linear probe accuracy" in capsys.readouterr().out
