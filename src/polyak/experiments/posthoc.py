"""``polyak experiment posthoc``: how close does post-hoc EMA get to an EMA of that exact width?

Each seed trains one MLP once. Alongside, a ``PostHocEMA`` stores sigma_rel 0.05 and 0.10 about 20 times
per run, and one ``EMA`` keeps the exact power-function EMA of every width of the grid. After training,
every width is synthesised from the snapshots and evaluated next to its exact twin (same seed, same
trajectory: a paired comparison), with the relative profile error and the relative L2 distance
between the two weight vectors. Widths are chosen on the validation split and reported on test.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from polyak import EMA, PostHocEMA
from polyak._progress import Progress
from polyak.posthoc import sigma_rel_to_gamma
from polyak.schedules import power_function

__all__ = ["PosthocConfig", "analyse", "run_posthoc", "run_seed", "write_report"]

GRID: tuple[float, ...] = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20)
STORED: tuple[float, ...] = (0.05, 0.10)


@dataclass(frozen=True)
class PosthocConfig:
    dataset: str = "regression"
    hidden: tuple[int, ...] = (64, 32)
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    snapshots: int = 20  # per run
    num_samples: int | None = None
    grid: tuple[float, ...] = GRID
    stored: tuple[float, ...] = STORED


def _rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    return math.sqrt(num / den) if den > 0 else 0.0


def run_seed(cfg: PosthocConfig, seed: int, workdir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train once; evaluate raw, every exact width and every synthesised width on val and test.
    ``progress`` advances once per epoch and once per width."""
    from polyak.experiments.datasets import load
    from polyak.experiments.models import mlp
    from polyak.experiments.runner import _batches, _evaluate

    torch.set_num_threads(1)
    data = load(cfg.dataset, seed, cfg.num_samples)
    torch.manual_seed(seed)
    out_features = 1 if data.task == "regression" else data.num_classes
    model = mlp(data.num_features, cfg.hidden, out_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = sum(1 for i in range(0, len(data.x_train), cfg.batch_size) if len(data.x_train) - i > 1)
    every = max(1, steps_per_epoch * cfg.epochs // cfg.snapshots)
    ph = PostHocEMA(model, cfg.stored, snapshot_every=every, directory=workdir / f"seed{seed}")
    exact = EMA(model, decay=[power_function(sigma_rel_to_gamma(s)) for s in cfg.grid])
    loss_fn: Any = torch.nn.functional.mse_loss if data.task == "regression" else torch.nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for xb, yb in _batches(data.x_train, data.y_train, cfg.batch_size, gen):
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            ph.update()
            exact.update()
        if progress is not None:
            progress.advance()
    if ph.step % every:
        ph.snapshot()  # the last step, so every width is synthesised at the end of training
    twin = mlp(data.num_features, cfg.hidden, out_features)
    widths: dict[str, Any] = {}
    for k, sigma in enumerate(cfg.grid):
        weights = ph.weights(sigma)
        synth = ph.snapshots().combine(weights)
        ph.copy_to(twin, sigma)
        post = _evaluate(twin, data)
        exact.copy_to(twin, index=k)
        ex = _evaluate(twin, data)
        averaged = exact.averaged_state_dict(k)
        reference = {key: averaged[key] for key in synth}
        widths[f"{sigma:g}"] = {
            "profile_error": weights.error,
            "gain": weights.gain,
            "weights_rel_l2": _rel_l2(synth, reference),
            "posthoc": post,
            "exact": ex,
        }
        if progress is not None:
            progress.advance()
    return {
        "seed": seed,
        "steps": ph.step,
        "snapshot_every": every,
        "seconds": time.perf_counter() - start,
        "raw": _evaluate(model, data),
        "widths": widths,
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def analyse(cfg: PosthocConfig, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per width, means over seeds of the profile error, the weights' relative L2 distance, the exact and
    the post-hoc test metric, and their paired difference (post-hoc - exact, 95% t-interval); the raw
    model's test metric; the best width on validation for each method."""
    from polyak.experiments.stats import paired_comparison, summarise

    higher = cfg.dataset != "regression"
    widths: dict[str, dict[str, Any]] = {}
    best: dict[str, tuple[float, str]] = {}
    for sigma in cfg.grid:
        key = f"{sigma:g}"
        rows = [s["widths"][key] for s in seeds]
        post = [r["posthoc"]["test"] for r in rows]
        ex = [r["exact"]["test"] for r in rows]
        cmp = paired_comparison(post, ex, higher_is_better=higher)
        multi = len(seeds) > 1
        widths[key] = {
            "profile_error": summarise([r["profile_error"] for r in rows]).mean,
            "weights_rel_l2": summarise([r["weights_rel_l2"] for r in rows]).mean,
            "exact": summarise(ex).mean,
            "posthoc": summarise(post).mean,
            "difference": cmp.mean_diff,
            "ci95": [cmp.ci95_low, cmp.ci95_high] if multi else None,
        }
        for which in ("exact", "posthoc"):
            val = summarise([r[which]["val"] for r in rows]).mean
            score = val if higher else -val
            if which not in best or score > best[which][0]:
                best[which] = (score, key)
    return {
        "metric": "accuracy %" if higher else "MSE",
        "higher_is_better": higher,
        "raw": summarise([s["raw"]["test"] for s in seeds]).mean,
        "widths": widths,
        "best_width": {which: key for which, (_, key) in best.items()},
    }


def write_report(out: Path, cfg: PosthocConfig, seeds: list[dict[str, Any]], *, command: str, seconds: float) -> Path:
    """``report.md`` and ``results.json``: per width, exact vs post-hoc (paired over seeds), and the best width."""
    analysis = analyse(cfg, seeds)
    metric = analysis["metric"]
    lines = [
        f"# Post-hoc EMA vs the exact EMA of each width ({cfg.dataset})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}; wall time {seconds:.0f} s; "
        f"{len(seeds)} seed(s), {seeds[0]['steps']} steps each, a snapshot every {seeds[0]['snapshot_every']} "
        f"steps of sigma_rel {', '.join(f'{s:g}' for s in cfg.stored)}.",
        "",
        f"Test {metric}: mean over seeds. Difference = post-hoc - exact, paired by seed, with its 95% t-interval.",
        "",
        "| sigma_rel | profile error | weights rel. L2 | exact | post-hoc | difference (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for key, w in analysis["widths"].items():
        ci = f"[{_fmt(w['ci95'][0])}, {_fmt(w['ci95'][1])}]" if w["ci95"] is not None else "-"
        lines.append(
            f"| {key} | {w['profile_error']:.2e} | {w['weights_rel_l2']:.2e} | {_fmt(w['exact'])} | "
            f"{_fmt(w['posthoc'])} | {_fmt(w['difference'])} {ci} |"
        )
    best = analysis["best_width"]
    lines += [
        "",
        f"Raw model (no averaging): test {metric} {_fmt(analysis['raw'])}.",
        f"Best width on validation: exact EMA sigma_rel {best['exact']}, post-hoc sigma_rel {best['posthoc']}.",
        "",
        "The profile error is the relative L2 distance between the synthesised averaging profile and the exact one "
        "(0 for a stored width); 'weights rel. L2' is the distance between the two averaged weight vectors.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"experiment": "posthoc", "config": asdict(cfg), "command": command, "seeds": seeds}, indent=1),
        encoding="utf-8",
    )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_posthoc(args: argparse.Namespace) -> int:
    """The ``polyak experiment posthoc`` handler (``--dataset``, ``--seeds``, ``--epochs``, ``--samples``,
    ``--lr``, ``--quick``, ``--out``, ``--quiet``, ``--json``)."""
    import shlex
    import sys

    from polyak.experiments.cli import _options, _out_dir, _paths, _print_json

    opts = _options(args)
    dataset = opts.dataset or "regression"
    hidden = {"regression": (64, 32), "digits": (128, 64), "mnist1d": (256, 128)}.get(dataset)
    if hidden is None:
        raise ValueError(f"unknown data set {dataset!r}; choose regression, digits or mnist1d")
    epochs = opts.epochs or (10 if opts.quick else 30)
    cfg = PosthocConfig(dataset, hidden, epochs, opts.lr or 1e-3, num_samples=opts.num_samples)
    out = _out_dir(Path(args.out or "reports/posthoc"))
    start = time.perf_counter()
    seed_ids = range(opts.first_seed, opts.first_seed + opts.seeds)
    total = len(seed_ids) * (cfg.epochs + len(cfg.grid))
    with tempfile.TemporaryDirectory(prefix="posthoc-") as tmp, Progress(total, "posthoc", quiet=args.quiet) as bar:
        seeds = [run_seed(cfg, seed, Path(tmp), bar) for seed in seed_ids]
    command = "polyak " + shlex.join(sys.argv[1:])
    seconds = time.perf_counter() - start
    path = write_report(out, cfg, seeds, command=command, seconds=seconds)
    if args.json:
        summary = {"analysis": analyse(cfg, seeds), "claims": []}
        _print_json({"experiment": "posthoc", **_paths(out), "seconds": seconds, **summary})
    else:
        print(f"report: {path}")
    return 0
