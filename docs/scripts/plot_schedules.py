"""Draw β_t, and the weight 1 − β_t of the newest sample, for every built-in schedule (docs/schedules.md).

Usage: ``python docs/scripts/plot_schedules.py --out docs/img`` (``make docs-plots``). Writes one PNG per
schedule, ``schedule_<name>.png``, and ``schedules.png`` with all of them; PNG metadata carries no date
or version, so an unchanged schedule redraws to the same file with the same matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from polyak import schedules

# The settings drawn on the page: each schedule's common or default configuration.
EXAMPLES: dict[str, schedules.Schedule] = {
    "constant": schedules.constant(0.999),
    "ultralytics": schedules.ultralytics(0.9999, tau=2000),
    "num_updates": schedules.num_updates(0.9999),
    "inverse_gamma": schedules.inverse_gamma(0.9999, 1.0, 2 / 3),
    "half_life": schedules.half_life(500),
    "power_function": schedules.power_function(7.0),
    "uniform": schedules.uniform(),
    # teacher momentum schedules, over a run of 100,000 iterations (1,000 per epoch)
    "dino": schedules.dino(100_000, base=0.996),
    "dinov2": schedules.dinov2(100_000, base=0.992),
    "lightly_cosine": schedules.lightly_cosine(100_000, 0.996, 1.0),
    "moco_v3": schedules.moco_v3(100, 1000, base=0.99),
    "ijepa": schedules.ijepa(1000, 100, 0.996, 1.0),
    "mean_teacher": schedules.mean_teacher(0.999),
}
STEPS = np.unique(np.geomspace(1, 100_000, 400).astype(int))


def curve(schedule: schedules.Schedule) -> np.ndarray:
    return np.array([schedule(int(t)) for t in STEPS])


def _axes(ax_beta, ax_weight, label: str, beta: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    ax_beta.plot(STEPS, beta, label=label)
    ax_weight.plot(STEPS, np.clip(1.0 - beta, 1e-7, None), label=label)
    for ax in (ax_beta, ax_weight):
        ax.set_xscale("log")
        ax.set_xlabel("averaging update t")
        ax.grid(True, which="major", alpha=0.3)
    ax_beta.set_ylabel("β_t")
    ax_beta.set_ylim(-0.02, 1.02)
    ax_weight.set_yscale("log")
    ax_weight.set_ylabel("1 − β_t (weight of the newest sample)")


def draw(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    everything, (all_beta, all_weight) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, schedule in EXAMPLES.items():
        beta = curve(schedule)
        fig, (ax_beta, ax_weight) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
        _axes(ax_beta, ax_weight, repr(schedule), beta)
        fig.suptitle(repr(schedule))
        path = out / f"schedule_{name}.png"
        fig.savefig(path, dpi=80, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
        _axes(all_beta, all_weight, name, beta)
    all_weight.legend(fontsize=8)
    path = out / "schedules.png"
    everything.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(everything)
    return [*written, path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs (default: docs/img)")
    args = parser.parse_args()
    for path in draw(Path(args.out)):
        print(path)


if __name__ == "__main__":
    main()
