"""Train one model per (arm, seed) and record raw and averaged metrics at every epoch.

One training run feeds every average at once: a single ``EMA`` keeps all decays/schedules
(``decay=[...]``, read with ``apply(index=k)``), so every average of a seed sees the very same raw
trajectory and the comparison between decays is paired. SWA is an ``EMA`` with ``schedules.uniform()``
started at ``start_step``; BatchNorm variants evaluate the averaged weights with the raw model's running
statistics ("stale") and with statistics recomputed by ``polyak.update_bn`` ("recomputed").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from polyak import EMA, schedules, update_bn
from polyak.experiments.datasets import Split, load
from polyak.experiments.models import mlp

__all__ = ["AverageSpec", "RunConfig", "make_schedule", "train_seed"]

SCHEDULE_KINDS: tuple[str, ...] = ("constant", "num_updates", "ultralytics", "inverse_gamma", "power_function")


@dataclass(frozen=True)
class AverageSpec:
    """One average kept during training: ``kind`` of warm-up with its target ``decay`` (``tau`` for
    ``ultralytics``, ``gamma`` for ``power_function``), optionally ``debias``-ed. ``name`` labels it in
    results (e.g. ``ema0.99``)."""

    name: str
    kind: str = "constant"
    decay: float = 0.99
    tau: float = 2000.0
    gamma: float = 0.0
    debias: bool = False

    def schedule(self) -> Callable[[int], float]:
        return make_schedule(self.kind, self.decay, self.tau, self.gamma)

    def label(self) -> str:
        if self.kind == "constant":
            return f"constant {self.decay}" + (", debias" if self.debias else "")
        if self.kind == "num_updates":
            return f"min({self.decay}, (1+t)/(10+t))"
        if self.kind == "inverse_gamma":
            return f"min({self.decay}, 1-(1+t)^(-2/3))"
        if self.kind == "power_function":
            return f"(1-1/t)^({self.gamma:.4g}+1)"
        return f"{self.decay}·(1-exp(-t/{self.tau:g}))"


def make_schedule(kind: str, decay: float, tau: float = 2000.0, gamma: float = 0.0) -> Callable[[int], float]:
    """``constant`` -> ``schedules.constant``; ``num_updates`` -> the (1+t)/(10+t) warm-up;
    ``ultralytics`` -> ``decay * (1 - exp(-t / tau))``; ``inverse_gamma`` -> ``schedules.inverse_gamma``
    with ``max_decay=decay`` (ema-pytorch's defaults otherwise); ``power_function`` ->
    ``schedules.power_function(gamma)``."""
    if kind == "constant":
        return schedules.constant(decay)
    if kind == "num_updates":
        return schedules.num_updates(decay)
    if kind == "ultralytics":
        return schedules.ultralytics(decay, tau=tau)
    if kind == "inverse_gamma":
        return schedules.inverse_gamma(decay)
    if kind == "power_function":
        return schedules.power_function(gamma)
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (written verbatim into results.json)."""

    dataset: str
    hidden: tuple[int, ...]
    averages: tuple[AverageSpec, ...]
    epochs: int
    batchnorm: bool = False
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" (to 0 over the run, per step)
    swa_start: float | None = None  # SWA: uniform average over steps after this fraction of training
    bn_variants: bool = False  # also evaluate the first average with stale and recomputed BN statistics
    num_samples: int | None = None
    patience: int = 10
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_names(self) -> list[str]:
        """Names of the evaluated models, ``raw`` first."""
        names = ["raw", *(a.name for a in self.averages)]
        if self.swa_start is not None:
            names.append("swa")
        if self.bn_variants and self.batchnorm:
            names += [f"{self.averages[0].name}_stale", f"{self.averages[0].name}_recomputed"]
        return names


def _batches(x: Tensor, y: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) > 1:  # BatchNorm cannot train on a batch of one
            yield x[idx], y[idx]


@torch.no_grad()
def _evaluate(model: nn.Module, data: Split) -> dict[str, float]:
    """Metric (MSE for regression, accuracy in % for classification) and loss on val and test."""
    model.eval()
    out: dict[str, float] = {}
    for part, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        pred = model(x)
        if data.task == "regression":
            loss = float(nn.functional.mse_loss(pred, y))
            out[part], out[f"{part}_loss"] = loss, loss
        else:
            out[part] = float((pred.argmax(1) == y).double().mean()) * 100.0
            out[f"{part}_loss"] = float(nn.functional.cross_entropy(pred, y))
    model.train()
    return out


def train_seed(
    config: RunConfig, seed: int, data: Split | None = None, on_epoch: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Train one model for ``config.epochs`` and evaluate raw and every average after each epoch
    (then ``on_epoch()``, e.g. to advance a progress bar).

    Returns ``{"seed", "seconds", "steps", "curves": {model: {"val", "test", "val_loss", "test_loss"}}}``
    where each curve has one value per epoch. The generative tasks (``tasks.TASKS``) train in
    ``tasks.train_task``.
    """
    from polyak.experiments.tasks import TASKS, train_task

    if config.dataset in TASKS:
        return train_task(config, seed, on_epoch)
    torch.set_num_threads(config.threads)
    if data is None:
        data = load(config.dataset, seed, config.num_samples)
    torch.manual_seed(seed)
    out_features = 1 if data.task == "regression" else data.num_classes
    model = mlp(data.num_features, config.hidden, out_features, batchnorm=config.batchnorm)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = sum(1 for i in range(0, len(data.x_train), config.batch_size) if len(data.x_train) - i > 1)
    total_steps = steps_per_epoch * config.epochs
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    elif config.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")

    if any(a.debias for a in config.averages):
        raise ValueError(f"debias=True averages are run by the generative tasks only, not on {config.dataset!r}")
    ema = EMA(model, decay=[a.schedule() for a in config.averages])
    swa = None
    if config.swa_start is not None:
        swa = EMA(model, decay=schedules.uniform(), start_step=int(config.swa_start * total_steps))
    stale = None
    if config.bn_variants and config.batchnorm:
        stale = EMA(model, decay=config.averages[0].schedule(), buffers="copy")

    names = config.model_names()
    curves: dict[str, dict[str, list[float]]] = {
        n: {"val": [], "test": [], "val_loss": [], "test_loss": []} for n in names
    }
    loss_fn: Callable[[Tensor, Tensor], Tensor] = (
        nn.functional.mse_loss if data.task == "regression" else nn.functional.cross_entropy
    )
    gen = torch.Generator().manual_seed(seed)
    bn_gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        for xb, yb in _batches(data.x_train, data.y_train, config.batch_size, gen):
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            ema.update()
            if swa is not None:
                swa.update()
            if stale is not None:
                stale.update()
        evaluated: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [("raw", nullcontext)]
        evaluated += [(a.name, lambda k=k: ema.apply(index=k)) for k, a in enumerate(config.averages)]  # type: ignore[misc]
        if swa is not None:
            evaluated.append(("swa", swa.apply))
        for name, context in evaluated:
            with context():
                _record(curves[name], _evaluate(model, data))
        if stale is not None:
            with stale.apply():
                _record(curves[f"{config.averages[0].name}_stale"], _evaluate(model, data))
                update_bn(_batches(data.x_train, data.y_train, 256, bn_gen), model)
                _record(curves[f"{config.averages[0].name}_recomputed"], _evaluate(model, data))
        if on_epoch is not None:
            on_epoch()
    return {
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "steps": total_steps,
        "curves": curves,
    }


def _record(curve: dict[str, list[float]], metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        curve[key].append(value if math.isfinite(value) else float("nan"))
