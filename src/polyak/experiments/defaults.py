"""``polyak experiment defaults``: which decay should ``EMA(model)`` use when the user gives none?

Every candidate is an average of the SAME training run of each seed (one ``EMA`` holds them all), over
every task family x run length (short, long) x learning rate (a smooth and a noisy one). For each
setting, each candidate is compared with the raw weights and with the best candidate of that setting
(lowest mean test metric), by the paired statistics of ``stats.paired_comparison``: a win / loss is a
95% interval of the mean paired difference that excludes 0, otherwise a tie.

The rule (``choose_default``): among the candidates never significantly worse than raw, the one that
wins against raw most often; ties broken by how often it is the best or tied with it, then by its mean
rank. If no candidate qualifies, the current default is kept.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from polyak.experiments.runner import AverageSpec, RunConfig
from polyak.experiments.stats import PairedComparison, paired_comparison, summarise
from polyak.experiments.tasks import METRICS
from polyak.posthoc import sigma_rel_to_gamma  # EDM2's sigma_rel -> gamma, one implementation

__all__ = [
    "CANDIDATES",
    "CURRENT_DEFAULT",
    "FULL",
    "QUICK",
    "TINY",
    "Scale",
    "analyse_defaults",
    "build_arms",
    "candidates",
    "choose_default",
    "default_spec",
    "sigma_rel_to_gamma",
    "write_defaults",
]

SIGMA_RELS: tuple[float, ...] = (0.05, 0.10, 0.20)
CURRENT_DEFAULT = "constant 0.9999"


def candidates() -> tuple[AverageSpec, ...]:
    """The candidate defaults, named as the report shows them."""
    specs = [
        AverageSpec("constant 0.999", "constant", 0.999),
        AverageSpec(CURRENT_DEFAULT, "constant", 0.9999),
        AverageSpec("constant 0.9999, debias", "constant", 0.9999, debias=True),
        AverageSpec("inverse-gamma warm-up", "inverse_gamma", 0.9999),
        AverageSpec("Ultralytics tau=2000", "ultralytics", 0.9999, tau=2000.0),
    ]
    specs += [
        AverageSpec(f"power sigma_rel={s:g}", "power_function", gamma=round(sigma_rel_to_gamma(s), 4))
        for s in SIGMA_RELS
    ]
    return tuple(specs)


CANDIDATES: tuple[str, ...] = tuple(a.name for a in candidates())


def default_spec() -> AverageSpec:
    """The average ``EMA(model)`` keeps when no decay is given (``schedules.DEFAULT_DECAY``)."""
    from polyak.schedules import DEFAULT_DECAY

    return AverageSpec("EMA() default", "power_function", gamma=DEFAULT_DECAY.gamma)


@dataclass(frozen=True)
class Scale:
    """Sizes of the defaults experiment: per task, the model, batch, run lengths (steps) and learning
    rates, and the task's own size arguments."""

    hidden: dict[str, tuple[int, ...]]
    batch: dict[str, int]
    lengths: dict[str, tuple[int, int]]  # (short, long) in steps
    lrs: dict[str, tuple[float, float]]  # (smooth, noisy) Adam learning rates
    task_args: dict[str, dict[str, Any]]
    evaluations: int = 2  # evaluations per run (the last one is scored)


FULL = Scale(
    hidden={"swissroll": (64, 64, 64), "stdlib-text": (32, 2)},
    batch={"swissroll": 128, "stdlib-text": 16},
    lengths={"swissroll": (1000, 4000), "stdlib-text": (400, 1600)},
    lrs={"swissroll": (1e-3, 1e-2), "stdlib-text": (2e-3, 1e-2)},
    task_args={"swissroll": {}, "stdlib-text": {"eval_chars": 4096}},
)
QUICK = replace(FULL, lengths={"swissroll": (400, 1600), "stdlib-text": (200, 800)})
TINY = Scale(
    hidden={"swissroll": (8,), "stdlib-text": (8, 1)},
    batch={"swissroll": 16, "stdlib-text": 4},
    lengths={"swissroll": (4, 8), "stdlib-text": (4, 8)},
    lrs=FULL.lrs,
    task_args={
        "swissroll": {"n_train": 64, "n_eval": 32, "steps": 5},
        "stdlib-text": {"eval_chars": 260, "context": 12, "heads": 2},
    },
)


def build_arms(scale: Scale = FULL) -> list[tuple[str, RunConfig]]:
    """One arm per task x length x learning rate, each keeping every candidate."""
    arms: list[tuple[str, RunConfig]] = []
    for task in ("swissroll", "stdlib-text"):
        for length_name, steps in zip(("short", "long"), scale.lengths[task]):
            for lr_name, lr in zip(("smooth", "noisy"), scale.lrs[task]):
                per_epoch = max(1, steps // scale.evaluations)
                cfg = RunConfig(
                    task,
                    scale.hidden[task],
                    candidates(),
                    scale.evaluations,
                    batch_size=scale.batch[task],
                    lr=lr,
                    extra={"steps_per_epoch": per_epoch, "task": dict(scale.task_args[task])},
                )
                arms.append((f"{task}, {length_name} ({per_epoch * cfg.epochs} steps), {lr_name} lr {lr:g}", cfg))
    return arms


def _final(seeds: Sequence[dict[str, Any]], model: str) -> list[float]:
    return [float(s["curves"][model]["test"][-1]) for s in seeds]


def _outcome(c: PairedComparison) -> str:
    return "win" if c.improves else ("loss" if c.worsens else "tie")


def analyse_defaults(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per setting: every candidate vs raw and vs the setting's best candidate; then the tally and choice.

    All metrics are lower-is-better (energy distance, bits per character).
    """
    settings: dict[str, Any] = {}
    names: list[str] = []
    for label, arm in results.items():
        seeds = arm["seeds"]
        names = [a["name"] for a in arm["config"]["averages"]]
        raw = _final(seeds, "raw")
        finals = {n: _final(seeds, n) for n in names}
        means = {n: summarise(v).mean for n, v in finals.items()}
        best = min(names, key=lambda n: (math.isnan(means[n]), means[n]))
        order = sorted(names, key=lambda n: (math.isnan(means[n]), means[n]))
        settings[label] = {
            "raw": summarise(raw),
            "best": best,
            "rank": {n: order.index(n) + 1 for n in names},
            "vs_raw": {n: paired_comparison(finals[n], raw, higher_is_better=False) for n in names},
            "vs_best": {
                n: paired_comparison(finals[n], finals[best], higher_is_better=False) for n in names if n != best
            },
        }
    tally: dict[str, dict[str, Any]] = {}
    for n in names:
        vs_raw = [_outcome(s["vs_raw"][n]) for s in settings.values()]
        vs_best = ["best" if s["best"] == n else _outcome(s["vs_best"][n]) for s in settings.values()]
        tally[n] = {
            "raw_wins": vs_raw.count("win"),
            "raw_ties": vs_raw.count("tie"),
            "raw_losses": vs_raw.count("loss"),
            "best": vs_best.count("best"),
            "best_ties": vs_best.count("tie"),
            "best_losses": vs_best.count("loss"),
            "mean_rank": math.fsum(s["rank"][n] for s in settings.values()) / max(1, len(settings)),
        }
    return {"settings": settings, "tally": tally, "choice": choose_default(tally)}


def choose_default(tally: dict[str, dict[str, Any]]) -> str:
    """Never significantly worse than raw, most wins against raw, then most best-or-tied, then mean rank;
    ``CURRENT_DEFAULT`` when no candidate is never worse than raw."""
    safe = [n for n, t in tally.items() if t["raw_losses"] == 0]
    if not safe:
        return CURRENT_DEFAULT
    return min(
        safe, key=lambda n: (-tally[n]["raw_wins"], -(tally[n]["best"] + tally[n]["best_ties"]), tally[n]["mean_rank"])
    )


def _g(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.4g}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _jsonable(value: Any) -> Any:
    if isinstance(value, PairedComparison):
        return value.as_dict()
    if hasattr(value, "as_dict"):
        return _jsonable(value.as_dict())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_lines(results: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> list[str]:
    """The verdict table, the choice, and one table per setting."""
    tally, choice = analysis["tally"], analysis["choice"]
    first = next(iter(results.values()))
    n_seeds = len(first["seeds"])
    specs = {a["name"]: a for a in first["config"]["averages"]}
    lines = [
        "## Verdict",
        "",
        f"{len(results)} settings (task x run length x learning rate), {n_seeds} seeds each. Against raw: "
        "W = the candidate's test metric is significantly better (95% interval of the mean paired "
        "difference below 0), L = significantly worse, T = neither. Against the best candidate of each "
        "setting (lowest mean): B = it is the best, T = not significantly worse than the best, L = "
        "significantly worse.",
        "",
        "| candidate | schedule | vs raw W/T/L | vs best B/T/L | mean rank | never worse than raw |",
        "|---|---|---|---|---|---|",
    ]
    for n, t in sorted(tally.items(), key=lambda kv: kv[1]["mean_rank"]):
        spec = AverageSpec(**specs[n])
        lines.append(
            f"| {n}{' (chosen)' if n == choice else ''} | `{spec.label()}` | {t['raw_wins']}/{t['raw_ties']}/"
            f"{t['raw_losses']} | {t['best']}/{t['best_ties']}/{t['best_losses']} | {t['mean_rank']:.2f} "
            f"| {'yes' if t['raw_losses'] == 0 else 'no'} |"
        )
    lines += [
        "",
        f"Chosen by the rule (never significantly worse than raw, then most wins against raw, then most "
        f"often best or tied with the best, then mean rank): **{choice}**"
        + (" (the current default: no candidate qualified)" if choice == CURRENT_DEFAULT else "")
        + ".",
        "",
        f"With {len(results)} settings x {len(tally)} candidates there are {len(results) * len(tally)} tests "
        "against raw at the 5% level; about one in twenty comparisons of equal models comes out "
        "'significant' by chance, so read single wins or losses in a row with that in mind.",
        "",
    ]
    for label, s in analysis["settings"].items():
        arm = results[label]
        cfg = arm["config"]
        metric = METRICS[cfg["dataset"]]
        lines += [
            f"## {label}",
            "",
            f"{n_seeds} seeds, {arm['seeds'][0]['steps']} steps, batch {cfg['batch_size']}, Adam lr "
            f"{cfg['lr']:g} ({cfg['lr_schedule']}), model sizes {tuple(cfg['hidden'])}. Test {metric} at the "
            f"last step (lower is better); raw: {_g(s['raw'].mean)} ± {_g(s['raw'].std)}.",
            "",
            "| candidate | mean ± std | − raw [95% CI] | relative | vs raw | − best [95% CI] | vs best |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in sorted(s["vs_raw"], key=lambda n: s["rank"][n]):
            c = s["vs_raw"][n]
            b = s["vs_best"].get(n)
            best_cells = (
                "— | best" if b is None else f"{_g(b.mean_diff)} [{_g(b.ci95_low)}, {_g(b.ci95_high)}] | {_outcome(b)}"
            )
            lines.append(
                f"| {n} | {_g(c.averaged.mean)} ± {_g(c.averaged.std)} | {_g(c.mean_diff)} "
                f"[{_g(c.ci95_low)}, {_g(c.ci95_high)}] | {_pct(c.relative_change)} | {_outcome(c)} "
                f"(seeds {c.wins}/{c.ties}/{c.losses}) | {best_cells} |"
            )
        lines.append("")
    return lines


def write_defaults(
    out_dir: Path, results: dict[str, dict[str, Any]], *, command: str, seconds: float, versions: dict[str, str]
) -> dict[str, Any]:
    """Write ``report.md`` (verdict, choice, per-setting tables), ``results.json`` and ``defaults.png``."""
    from polyak.experiments import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse_defaults(results)
    lines = [
        "# polyak experiment: defaults",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} CPU, torch {versions.get('torch', '?')}, Python "
        f"{versions.get('python', '?')}; wall time {seconds:.0f} s.",
        "",
        "Which decay should `EMA(model)` use when none is given? Every candidate is an average of the same "
        "training run of each seed (one EMA holds them all), so every comparison is paired by seed.",
        "",
        *report_lines(results, analysis),
    ]
    png = plots.plot_defaults(
        {label: {n: c.relative_change for n, c in s["vs_raw"].items()} for label, s in analysis["settings"].items()},
        out_dir / "defaults.png",
    )
    lines += [f"![relative change against raw]({png.name})", ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {
        "experiment": "defaults",
        "command": command,
        "seconds": seconds,
        "versions": versions,
        "arms": results,
        "analysis": _jsonable(analysis),
        "claims": [],
    }
    (out_dir / "results.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n", encoding="utf-8")
    return {"analysis": analysis, "claims": []}
