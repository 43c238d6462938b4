"""The picture that makes a post-hoc EMA trustworthy: the stored profiles, the one asked for, and the one
the least-squares combination actually gives (matplotlib, Agg backend; the ``[experiments]`` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from polyak.posthoc._math import _rows, gamma_to_sigma_rel
from polyak.posthoc._snapshots import Synthesis

__all__ = ["plot_profiles"]


def plot_profiles(synthesis: Synthesis, update_every: int, path: str | os.PathLike[str]) -> Path:
    """Write a PNG: weight per training step of every stored average used (thin), of the exact
    power-function EMA of ``synthesis.sigma_rel`` (dashed) and of the synthesised one (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, n = update_every, synthesis.at // update_every
    stored = [(s // k, g) for s, g in zip(synthesis.steps, synthesis.gammas)]
    rows = _rows([*stored, (n, synthesis.gamma)], 1, n + 1) / k  # weight per step
    steps = torch.arange(1, n + 1) * k
    synth = torch.tensor(synthesis.coefficients, dtype=torch.float64) @ rows[:-1]
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=90)
    colours: dict[float, Any] = {}
    for row, (_, gamma) in zip(rows[:-1], stored):
        label = None
        if gamma not in colours:
            colours[gamma] = f"C{len(colours)}"
            label = f"stored, sigma_rel {gamma_to_sigma_rel(gamma):.3g}"
        ax.plot(steps, row, color=colours[gamma], lw=0.6, alpha=0.5, label=label)
    ax.plot(steps, rows[-1], "k--", lw=2.0, label=f"exact, sigma_rel {synthesis.sigma_rel:g}")
    ax.plot(steps, synth, color="C3", lw=1.5, label=f"synthesised (profile error {synthesis.error:.2%})")
    top = float(rows[-1].max())
    ax.set_ylim(min(float(synth.min()), 0.0) - 0.1 * top, 2.5 * top)  # early snapshots' peaks are off the chart
    ax.set_xlabel("training step")
    ax.set_ylabel("weight per step")
    ax.set_title(f"post-hoc EMA at step {synthesis.at}: {len(stored)} stored averages", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
