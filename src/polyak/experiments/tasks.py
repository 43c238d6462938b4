"""Training tasks where averaging is standard practice: a diffusion model and a small language model.

A task owns its data, its model, one minibatch loss and its evaluation; ``train_task`` is the loop that
every task shares. It matches ``runner.train_seed``: one training run per seed feeds raw and every
average (one ``EMA`` holds all decays, so the comparison between averages is paired), and it returns
the same ``{"seed", "seconds", "steps", "curves"}`` record, so the reports and statistics apply unchanged.

Training is counted in steps: an "epoch" here is one evaluation interval of
``config.extra["steps_per_epoch"]`` minibatch steps (default 250).

| task | data | model | metric (lower is better) |
|---|---|---|---|
| ``swissroll`` | ``sklearn.datasets.make_swiss_roll``, 2-D | DDPM denoiser (MLP) | energy distance of samples to held-out data |
| ``stdlib-text`` | Python's own standard-library source | character-level transformer | held-out bits per character |
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from polyak.experiments.runner import RunConfig

__all__ = ["METRICS", "TASKS", "Task", "build_task", "train_task"]

TASKS: tuple[str, ...] = ("swissroll", "stdlib-text")
METRICS: dict[str, str] = {"swissroll": "energy distance", "stdlib-text": "bits per character"}
DEFAULT_STEPS_PER_EPOCH = 250


class Task(Protocol):
    """One training problem: data made from ``seed``, a model, a minibatch loss and an evaluation."""

    metric: str  # what ``evaluate``'s "val"/"test" measure, e.g. "energy distance"

    def model(self) -> nn.Module: ...

    def batch(self, gen: torch.Generator) -> Tensor: ...

    def loss(self, model: nn.Module, batch: Tensor, gen: torch.Generator) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``{"val", "test", "val_loss", "test_loss"}``; deterministic for a given model."""
        ...


def build_task(config: RunConfig, seed: int) -> Task:
    """The task named by ``config.dataset`` for ``seed`` (sizes from ``config.hidden`` and ``config.extra``)."""
    if config.dataset == "swissroll":
        from polyak.experiments.diffusion import SwissRollDiffusion

        return SwissRollDiffusion(seed, config.hidden, config.batch_size, **config.extra.get("task", {}))
    if config.dataset == "stdlib-text":
        from polyak.experiments.charlm import StdlibCharLM

        return StdlibCharLM(seed, config.hidden, config.batch_size, **config.extra.get("task", {}))
    raise ValueError(f"unknown task {config.dataset!r}; choose one of {', '.join(TASKS)}")


def steps_per_epoch(config: RunConfig) -> int:
    return int(config.extra.get("steps_per_epoch", DEFAULT_STEPS_PER_EPOCH))


def train_task(config: RunConfig, seed: int, on_epoch: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``config.dataset`` for ``config.epochs`` evaluation intervals; evaluate raw and every average
    after each (then ``on_epoch()``, e.g. to advance a progress bar). ``config`` is a ``runner.RunConfig``;
    averages with ``debias=True`` share a second EMA."""
    from polyak import EMA, schedules

    torch.set_num_threads(config.threads)
    task = build_task(config, seed)
    torch.manual_seed(seed)
    model = task.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    per_epoch = steps_per_epoch(config)
    total_steps = per_epoch * config.epochs
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    elif config.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")

    # one EMA per debias setting, each holding all of its averages: (ema, index) per average name
    emas: list[Any] = []
    where: dict[str, tuple[int, int]] = {}
    for debias in (False, True):
        specs = [a for a in config.averages if a.debias == debias]
        if specs:
            emas.append(EMA(model, decay=[a.schedule() for a in specs], debias=debias))
            where.update({a.name: (len(emas) - 1, k) for k, a in enumerate(specs)})
    swa = None
    if config.swa_start is not None:
        swa = EMA(model, decay=schedules.uniform(), start_step=int(config.swa_start * total_steps))

    names = config.model_names()
    curves: dict[str, dict[str, list[float]]] = {
        n: {"val": [], "test": [], "val_loss": [], "test_loss": []} for n in names
    }
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        for _ in range(per_epoch):
            loss = task.loss(model, task.batch(gen), gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for ema in emas:
                ema.update()
            if swa is not None:
                swa.update()
        evaluated: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [("raw", nullcontext)]
        evaluated += [
            (a.name, lambda e=where[a.name][0], k=where[a.name][1]: emas[e].apply(index=k))  # type: ignore[misc]
            for a in config.averages
        ]
        if swa is not None:
            evaluated.append(("swa", swa.apply))
        for name, context in evaluated:
            with context():
                model.eval()
                metrics = task.evaluate(model)
                model.train()
            for key, value in metrics.items():
                curves[name][key].append(value if math.isfinite(value) else float("nan"))
        if on_epoch is not None:
            on_epoch()
    return {"seed": seed, "seconds": time.perf_counter() - start, "steps": total_steps, "curves": curves}
