"""``polyak demo`` and ``polyak experiment NAME``: train over seeds, write report.md, results.json, PNGs."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from polyak.experiments import EXPERIMENTS

__all__ = ["add_commands"]

DEMO_SEEDS = 8


def add_commands(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="quick report: does averaging help? (regression, digits, a diffusion model; 8 seeds, 1-3 minutes)",
        description="Run quick versions of the regression and digits experiments and write a report "
        "(report.md, results.json, PNG plots) that says which published claims about EMA reproduce, and "
        "show EMA()'s default decay against the raw weights of a small diffusion model (swissroll).",
    )
    demo.add_argument("--out", default="reports/demo", help="report directory (default: reports/demo)")
    demo.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"seeds per experiment (default: {DEMO_SEEDS})")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 40 regression, 20 digits)")
    demo.add_argument("--samples", type=int, default=None, help="subsample each data set to N samples")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--json", action="store_true", help="print a JSON summary on stdout (paths, claims, statistics)")
    demo.set_defaults(func=run_demo)

    exp: argparse.ArgumentParser = sub.add_parser(
        "experiment",
        help="run one experiment over many seeds and write its report",
        description="Experiments: regression (make_regression MLP, early stopping), digits and mnist1d "
        "(classifiers, with a BatchNorm model: stale vs recomputed statistics), sweep (decays x warm-ups, "
        "their traps on short runs), compare (EMA vs SWA vs raw, constant vs cosine LR; --dataset also "
        "swissroll or stdlib-text), swissroll (a DDPM denoiser, energy distance) and stdlib-text (a "
        "character-level transformer, bits per character): EMA()'s default vs raw, defaults (candidate "
        "default decays over both tasks x short/long runs x smooth/noisy learning rates), posthoc (post-hoc "
        "EMA of a grid of widths vs the exact EMA of each width).",
    )
    exp.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}, posthoc")
    exp.add_argument("--seeds", type=int, default=10, help="number of seeds (default: 10)")
    exp.add_argument("--epochs", type=int, default=None, help="epochs per run (default: per experiment)")
    exp.add_argument(
        "--decay", type=float, nargs="+", default=None, metavar="D", help="EMA decay(s) in [0, 1) (default: 0.99 0.999)"
    )
    exp.add_argument(
        "--dataset",
        default=None,
        help="sweep/compare: regression, digits or mnist1d; compare also swissroll or stdlib-text (default: regression)",
    )
    exp.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 0.001)")
    exp.add_argument("--samples", type=int, default=None, help="subsample the data set to N samples")
    exp.add_argument("--out", default=None, help="report directory (default: reports/NAME)")
    exp.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.add_argument("--json", action="store_true", help="print a JSON summary on stdout (paths, claims, statistics)")
    exp.set_defaults(func=run_experiment)

    rep: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="rebuild report.md and the plots from a results.json",
        description="Rebuild report.md, results.json's analysis and the PNG plots of an experiment from its "
        "results.json (no training), e.g. after changing the report code or to move a report.",
    )
    rep.add_argument("results", metavar="RESULTS_JSON", help="a results.json written by polyak experiment")
    rep.add_argument("--out", default=None, help="report directory (default: the folder of RESULTS_JSON)")
    rep.set_defaults(func=run_report)


def _positive(value: int | None, flag: str, minimum: int = 1, why: str = "") -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}{why}, got {value}")


def _out_dir(path: Path) -> Path:
    """Create the report folder before any training, so a bad --out fails in a second, not after an hour."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder; choose another path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _options(args: argparse.Namespace) -> Any:
    from polyak.experiments.suite import Options

    _positive(args.seeds, "--seeds")
    _positive(getattr(args, "epochs", None), "--epochs", 2, " (curve stability needs two epochs)")
    _positive(getattr(args, "samples", None), "--samples", 40, " (each of the 70/15/15 parts needs a few samples)")
    lr = getattr(args, "lr", None)
    if lr is not None and not (0.0 < lr < float("inf")):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    decays = getattr(args, "decay", None)
    for d in decays or ():
        if not 0.0 <= d < 1.0:
            raise ValueError(f"--decay must be in [0, 1), got {d}")
    if decays and len(set(decays)) != len(decays):
        raise ValueError(f"--decay lists a value twice: {decays}")
    return Options(
        seeds=args.seeds,
        epochs=getattr(args, "epochs", None),
        decays=tuple(decays) if decays else None,
        quick=getattr(args, "quick", False),
        dataset=getattr(args, "dataset", None),
        num_samples=getattr(args, "samples", None),
        lr=lr,
    )


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _command() -> str:
    return "polyak " + shlex.join(sys.argv[1:])


def run_experiment(args: argparse.Namespace) -> int:
    from polyak.experiments.report import write_experiment
    from polyak.experiments.suite import build_arms, run_arms

    if args.name == "posthoc":  # its own trainer and report: polyak.experiments.posthoc
        from polyak.experiments.posthoc import run_posthoc

        return run_posthoc(args)
    if args.name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}")
    opts = _options(args)
    arms = build_arms(args.name, opts)
    out = _out_dir(Path(args.out or f"reports/{args.name}"))
    start = time.perf_counter()
    results = run_arms(arms, opts, progress=_progress(args), title=args.name)
    seconds = time.perf_counter() - start
    summary = write_experiment(out, args.name, results, command=_command(), seconds=seconds)
    if args.json:
        _print_json({"experiment": args.name, **_paths(out), "seconds": seconds, **summary})
    else:
        print(f"report: {out / 'report.md'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from polyak.experiments.report import write_experiment, write_index
    from polyak.experiments.suite import build_arms, run_arms

    opts = _options(args)
    from dataclasses import replace

    opts = replace(opts, quick=True)
    out = _out_dir(Path(args.out))
    start = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    for name in ("regression", "digits", "swissroll"):
        t0 = time.perf_counter()
        results = run_arms(build_arms(name, opts), opts, progress=_progress(args), title=f"demo {name}")
        parts[name] = write_experiment(out / name, name, results, command=_command(), seconds=time.perf_counter() - t0)
        if not args.quiet:
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    index = write_index(out, parts, command=_command(), seconds=seconds)
    if args.json:
        experiments = {name: {**_paths(out / name), **part} for name, part in parts.items()}
        _print_json({"report": str(index), "seconds": seconds, "experiments": experiments})
    else:
        print(f"report: {index}")
    return 0


def _paths(out: Path) -> dict[str, str]:
    return {"report": str(out / "report.md"), "results": str(out / "results.json")}


def _print_json(summary: dict[str, Any]) -> None:
    """One JSON object on stdout for scripts; numpy scalars become numbers, NaN becomes null."""
    import json
    import math

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if getattr(value, "ndim", None) == 0:  # numpy / torch scalars
            value = value.item()
        elif hasattr(value, "tolist"):  # arrays
            return plain(value.tolist())
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return str(value)

    print(json.dumps(plain(summary), indent=2))


def run_report(args: argparse.Namespace) -> int:
    import json

    from polyak.experiments.report import write_experiment

    path = Path(args.results)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        name, arms = data["experiment"], data["arms"]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a results.json written by polyak experiment (missing {exc})") from exc
    if name not in EXPERIMENTS:
        raise ValueError(f"{path}: unknown experiment {name!r}")
    out = Path(args.out) if args.out else path.parent
    write_experiment(out, name, arms, command=data.get("command", "?"), seconds=float(data.get("seconds", 0.0)))
    print(f"report: {out / 'report.md'}")
    return 0
