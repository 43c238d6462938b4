"""The experiments' rich bar counts epochs (evaluation intervals for the generative tasks), so a long
seed moves it too, and it ends full; ``train_seed`` / ``train_task`` call ``on_epoch`` once per epoch."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

pytest.importorskip("sklearn")
rich_progress = pytest.importorskip("rich.progress")

from polyak.experiments.runner import AverageSpec, RunConfig, train_seed  # noqa: E402
from polyak.experiments.suite import Options, run_arms  # noqa: E402

TINY_DIFFUSION = {"n_train": 64, "n_eval": 32, "steps": 5}
AVERAGES = (AverageSpec("ema0.9", "constant", 0.9),)


def _task(epochs: int) -> RunConfig:
    extra = {"steps_per_epoch": 3, "task": TINY_DIFFUSION}
    return RunConfig("swissroll", (8,), AVERAGES, epochs, batch_size=16, extra=extra)


def _mlp(epochs: int) -> RunConfig:
    return RunConfig("regression", (8,), AVERAGES, epochs, num_samples=60)


@pytest.mark.parametrize("config", [_task(3), _mlp(2)], ids=["swissroll", "regression"])
def test_on_epoch_is_called_once_per_epoch(config: RunConfig) -> None:
    calls: list[int] = []
    record = train_seed(config, 0, on_epoch=lambda: calls.append(len(calls)))
    assert len(calls) == config.epochs == len(record["curves"]["raw"]["test"])


class FakeBar:
    """Stands in for rich.progress.Progress and records what run_arms asks of it."""

    made: ClassVar[list[FakeBar]] = []

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        self.total = 0.0
        self.completed = 0.0
        self.started = self.stopped = False
        self.descriptions: list[str] = []
        FakeBar.made.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def add_task(self, description: str, total: float) -> int:
        self.total = total
        return 7

    def update(self, task: int, description: str) -> None:
        assert task == 7
        self.descriptions.append(description)

    def advance(self, task: int, advance: float = 1.0) -> None:
        assert task == 7
        self.completed += advance


def test_run_arms_bar_counts_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rich_progress, "Progress", FakeBar)
    FakeBar.made.clear()
    arms = [("task", _task(3)), ("mlp", _mlp(2))]
    run_arms(arms, Options(seeds=2), progress=True, title="t")
    (bar,) = FakeBar.made
    assert bar.total == 2 * (3 + 2)
    assert bar.completed == bar.total
    assert bar.started
    assert bar.stopped
    assert bar.descriptions == ["t task seed 0", "t mlp seed 0", "t task seed 1", "t mlp seed 1"]


def test_run_arms_without_progress_makes_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rich_progress, "Progress", FakeBar)
    FakeBar.made.clear()
    run_arms([("mlp", _mlp(2))], Options(seeds=1), progress=False)
    assert FakeBar.made == []
