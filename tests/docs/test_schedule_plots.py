"""The schedule plots of docs/schedules.md come from docs/scripts/plot_schedules.py, one per schedule."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from polyak import schedules

ROOT = Path(__file__).resolve().parents[2]


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("plot_schedules", ROOT / "docs" / "scripts" / "plot_schedules.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def builtin_schedules() -> set[str]:
    return {name for name in schedules.__all__ if name.islower() and inspect.isclass(getattr(schedules, name))}


def test_every_schedule_is_drawn_and_on_the_page() -> None:
    script = load_script()
    page = (ROOT / "docs" / "schedules.md").read_text(encoding="utf-8")
    assert set(script.EXAMPLES) == builtin_schedules()
    for name in script.EXAMPLES:
        assert (ROOT / "docs" / "img" / f"schedule_{name}.png").is_file(), f"run `make docs-plots` ({name})"
        assert f"img/schedule_{name}.png" in page


def test_script_draws_the_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = load_script().draw(tmp_path)
    assert {p.name for p in written} == {f"schedule_{n}.png" for n in builtin_schedules()} | {"schedules.png"}
    assert all(p.stat().st_size > 1000 for p in written)
