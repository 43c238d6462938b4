"""The named experiments: which arms (training set-ups) each trains per seed, and the loop over seeds.

| experiment | arms (one model per seed each) | averages |
|---|---|---|
| regression | MLP 20-64-32-1 on make_regression, Adam lr 1e-3 and 1e-2 | EMA at each ``--decay`` |
| digits, mnist1d | MLP, and MLP with BatchNorm | EMA at each decay; BN: stale / averaged / recomputed statistics |
| sweep | one MLP | decays x warm-ups (constant, (1+t)/(10+t), 1-exp(-t/2000)) in one EMA |
| compare | constant LR, cosine LR | EMA, SWA (uniform average over the last 25% of steps) |
| swissroll, stdlib-text | the task of ``tasks.py`` at a smooth and a noisy Adam LR | ``EMA()``'s default decay, EMA at each decay |
| defaults | swissroll, stdlib-text x short, long x smooth, noisy LR | every candidate default (``defaults.py``) |

``compare`` also runs on the generative tasks (``--dataset swissroll`` or ``stdlib-text``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from polyak.experiments import EXPERIMENTS
from polyak.experiments.runner import AverageSpec, RunConfig, train_seed
from polyak.experiments.tasks import TASKS

__all__ = ["EXPERIMENTS", "Options", "build_arms", "run_arms"]

SWEEP_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999, 0.9999)


@dataclass(frozen=True)
class Options:
    """User choices shared by every experiment; ``None`` means the experiment's default."""

    seeds: int = 10
    epochs: int | None = None
    decays: tuple[float, ...] | None = None
    quick: bool = False
    dataset: str | None = None  # sweep/compare: which data set
    num_samples: int | None = None  # subsample (tests)
    hidden: tuple[int, ...] | None = None  # model widths (tests)
    first_seed: int = 0
    lr: float | None = None  # Adam learning rate (default 1e-3)


def _averages(decays: Sequence[float]) -> tuple[AverageSpec, ...]:
    return tuple(AverageSpec(f"ema{d:g}", "constant", d) for d in decays)


def _default_hidden(dataset: str) -> tuple[int, ...]:
    return {"regression": (64, 32), "digits": (128, 64), "mnist1d": (256, 128)}[dataset]


def build_arms(name: str, opts: Options) -> list[tuple[str, RunConfig]]:
    """The ``(label, config)`` arms of experiment ``name``."""
    arms = _build_arms(name, opts)
    if opts.lr is not None:
        arms = [(label, replace(cfg, lr=opts.lr)) for label, cfg in arms]
    return arms


def _build_arms(name: str, opts: Options) -> list[tuple[str, RunConfig]]:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if name == "defaults":
        return _defaults_arms(opts)
    if name in TASKS:
        return _task_arms(name, opts)
    decays = opts.decays or (0.99, 0.999)
    if name == "regression":
        epochs = opts.epochs or (40 if opts.quick else 100)
        base = RunConfig("regression", opts.hidden or (64, 32), _averages(decays), epochs, patience=10)
        base = replace(base, num_samples=opts.num_samples)
        if opts.lr is not None:
            return [(f"mlp, lr {opts.lr:g}", base)]
        # the same MLP at Adam's default step and at a 10x larger, noisier one: when does averaging help?
        return [("mlp, lr 0.001", base), ("mlp, lr 0.01", replace(base, lr=0.01))]
    if name in ("digits", "mnist1d"):
        epochs = opts.epochs or {"digits": (20 if opts.quick else 40), "mnist1d": (30 if opts.quick else 60)}[name]
        base = RunConfig(name, opts.hidden or _default_hidden(name), _averages(decays), epochs, patience=10)
        base = replace(base, num_samples=opts.num_samples)
        return [("mlp", base), ("mlp+batchnorm", replace(base, batchnorm=True, bn_variants=True))]
    dataset = opts.dataset or "regression"
    if name == "compare" and dataset in TASKS:
        return _task_compare_arms(dataset, opts)
    if dataset not in _DATASET_NAMES:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(_DATASET_NAMES)}")
    hidden = opts.hidden or _default_hidden(dataset)
    if name == "sweep":
        # ~20 regression epochs = 440 steps: the short run on which warm-ups and high decays misbehave.
        epochs = opts.epochs or (10 if opts.quick else 20)
        sweep_decays = opts.decays or SWEEP_DECAYS
        averages = tuple(
            AverageSpec(f"{kind}{d:g}", kind, d, 2000.0)
            for kind in ("constant", "num_updates", "ultralytics")
            for d in sweep_decays
        )
        return [("sweep", RunConfig(dataset, hidden, averages, epochs, num_samples=opts.num_samples))]
    # compare
    epochs = opts.epochs or (30 if opts.quick else 60)
    base = RunConfig(dataset, hidden, _averages(decays[:1]), epochs, swa_start=0.75, num_samples=opts.num_samples)
    return [("constant LR", base), ("cosine LR", replace(base, lr_schedule="cosine"))]


_DATASET_NAMES = ("regression", "digits", "mnist1d")


def _defaults_arms(opts: Options) -> list[tuple[str, RunConfig]]:
    from polyak.experiments import defaults

    fixed = {"--epochs": opts.epochs, "--decay": opts.decays, "--dataset": opts.dataset, "--lr": opts.lr}
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        raise ValueError(
            f"the defaults experiment runs fixed settings (both tasks, short and long runs, a smooth and a "
            f"noisy learning rate); drop {', '.join(given)} (--seeds and --quick apply)"
        )
    return defaults.build_arms(defaults.QUICK if opts.quick else defaults.FULL)


def _task_config(dataset: str, opts: Options, averages: tuple[AverageSpec, ...], epochs: int) -> RunConfig:
    """A generative task at the defaults experiment's model size and noisy learning rate, evaluated every
    250 steps (``epochs`` evaluations)."""
    from polyak.experiments import defaults

    scale = defaults.FULL
    return RunConfig(
        dataset,
        opts.hidden or scale.hidden[dataset],
        averages,
        epochs,
        batch_size=scale.batch[dataset],
        lr=scale.lrs[dataset][1],
        extra={"steps_per_epoch": 250, "task": dict(scale.task_args[dataset])},
    )


def _task_arms(name: str, opts: Options) -> list[tuple[str, RunConfig]]:
    """``EMA()``'s default and each ``--decay`` against raw, at the smooth and the noisy learning rate."""
    from polyak.experiments import defaults

    epochs = opts.epochs or {"swissroll": (6 if opts.quick else 16), "stdlib-text": (4 if opts.quick else 8)}[name]
    averages = (defaults.default_spec(), *_averages(opts.decays or (0.999,)))
    base = _task_config(name, opts, averages, epochs)
    if opts.lr is not None:
        return [(f"lr {opts.lr:g}", base)]
    smooth, noisy = defaults.FULL.lrs[name]
    if opts.quick:  # the demo: the noisy rate, where averaging matters
        return [(f"lr {noisy:g}", base)]
    return [(f"lr {smooth:g}", replace(base, lr=smooth)), (f"lr {noisy:g}", base)]


def _task_compare_arms(dataset: str, opts: Options) -> list[tuple[str, RunConfig]]:
    """compare on a generative task: EMA at each ``--decay`` (default 0.999) and SWA over the last 25%,
    constant vs cosine learning rate, ``--epochs`` x 250 steps (default 16, 8 with ``--quick``)."""
    epochs = opts.epochs or (8 if opts.quick else 16)
    base = _task_config(dataset, opts, _averages(opts.decays or (0.999,)), epochs)
    base = replace(base, swa_start=0.75)
    return [("constant LR", base), ("cosine LR", replace(base, lr_schedule="cosine"))]


def run_arms(
    arms: Sequence[tuple[str, RunConfig]], opts: Options, *, progress: bool, title: str = ""
) -> dict[str, dict[str, Any]]:
    """Train every arm on seeds ``first_seed .. first_seed + seeds - 1``; a rich progress bar when asked,
    counting epochs (evaluation intervals for the generative tasks), so a long seed moves it too."""
    from polyak.experiments.datasets import load

    seeds = list(range(opts.first_seed, opts.first_seed + opts.seeds))
    results: dict[str, dict[str, Any]] = {label: {"config": cfg.as_dict(), "seeds": []} for label, cfg in arms}
    total = len(seeds) * sum(cfg.epochs for _, cfg in arms)
    bar: Any = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        bar.start()
        task = bar.add_task(title, total=total)
    try:
        for seed in seeds:
            cache: dict[tuple[str, int | None], Any] = {}
            for label, cfg in arms:
                on_epoch = None
                if bar is not None:
                    bar.update(task, description=f"{title} {label} seed {seed}")
                    on_epoch = functools.partial(bar.advance, task)
                key = (cfg.dataset, cfg.num_samples)
                if key not in cache and cfg.dataset not in TASKS:  # a task makes its own data
                    cache[key] = load(cfg.dataset, seed, cfg.num_samples)
                results[label]["seeds"].append(train_seed(cfg, seed, cache.get(key), on_epoch))
    finally:
        if bar is not None:
            bar.stop()
    return results
