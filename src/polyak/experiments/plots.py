"""PNG plots of experiment results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_defaults", "plot_per_seed", "plot_sweep"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Title, legend and grid every plot shares; write the PNG and free the figure."""
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(
    seeds: Sequence[dict[str, Any]], models: Sequence[str], key: str, ylabel: str, title: str, path: Path
) -> Path:
    """Mean ± one std band over seeds of curve ``key`` (e.g. ``val``) per epoch, one line per model."""
    import numpy as np

    plt = _pyplot()
    log_y = "loss" in key or "MSE" in ylabel
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for name in models:
        values = np.array([s["curves"][name][key] for s in seeds], dtype=float)
        epochs = np.arange(1, values.shape[1] + 1)
        mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
        ax.plot(epochs, mean, label=name, lw=1.4)
        low = mean - std
        if log_y:  # a band reaching below 0 cannot be drawn on a log axis: clip it at the smallest value seen
            low = np.maximum(low, np.nanmin(values))
        ax.fill_between(epochs, low, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    return _finish(plt, fig, ax, title, path)


def plot_per_seed(
    raw: Sequence[float], averaged: dict[str, Sequence[float]], ylabel: str, title: str, path: Path
) -> Path:
    """Final metric per seed: raw vs each averaged model, one marker per seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    seeds = range(len(raw))
    ax.plot(seeds, raw, "o-", label="raw", color="black", lw=1)
    for name, values in averaged.items():
        ax.plot(seeds, values, "s--", label=name, lw=1, ms=4)
    ax.set_xlabel("seed")
    ax.set_ylabel(ylabel)
    return _finish(plt, fig, ax, title, path)


def plot_sweep(
    decays: Sequence[float],
    rows: dict[str, tuple[Sequence[float], Sequence[float]]],
    raw: tuple[float, float],
    ylabel: str,
    title: str,
    path: Path,
    *,
    log_y: bool,
) -> Path:
    """Final metric (mean ± std over seeds) against decay, one line per warm-up schedule; raw as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    x = [1.0 - d for d in decays]
    for label, (means, stds) in rows.items():
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label, lw=1.2)
    ax.axhline(raw[0], color="black", lw=1, label="raw")
    ax.axhspan(raw[0] - raw[1], raw[0] + raw[1], color="black", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(d) for d in decays])
    ax.invert_xaxis()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("decay")
    ax.set_ylabel(ylabel)
    return _finish(plt, fig, ax, title, path)


def plot_defaults(relative: dict[str, dict[str, float]], path: Path) -> Path:
    """Heat map of ``relative[setting][candidate]`` (mean paired change against raw, lower is better),
    colours clipped at ±100%, each cell labelled with its value."""
    import numpy as np

    plt = _pyplot()
    settings = list(relative)
    names = list(next(iter(relative.values())))
    values = np.array([[relative[s][n] for n in names] for s in settings], dtype=float) * 100.0
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 4.0, 0.45 * len(settings) + 2.2), dpi=90)
    ax.imshow(np.clip(values, -100, 100), cmap="RdYlGn_r", vmin=-100, vmax=100, aspect="auto")
    for i in range(len(settings)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:+.0f}%",
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(settings)), settings, fontsize=8)
    ax.set_title("test metric of each candidate vs raw (mean paired change; lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
