"""Post-hoc EMA accuracy: polyak.PostHocEMA and ema-pytorch's PostHocEMA against the exact EMA.

One random walk of weights (theta_t = theta_{t-1} + N(0, 0.1^2), 2,000 steps, 1,000 weights) goes through
both libraries, each storing sigma_rel 0.05 and 0.10 every 200 steps; each then synthesises a grid of
widths at the last step, compared with the exact power-function EMA of that width computed in float64
from the closed form. ema-pytorch runs with its defaults (``update_every=100``, float16 checkpoints) and
with ``update_every=1``. A second walk holds theta_1 = 1 and every later theta = 0: what comes back is
the weight that each synthesis puts on the first step's weights.

Run: ``.venv/bin/python benchmarks/posthoc_accuracy.py`` (needs ema-pytorch; about a minute on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyak import PostHocEMA
from polyak.posthoc import profile, sigma_rel_to_gamma

STEPS, EVERY, SIZE = 2000, 200, 1000
WIDTHS = (0.03, 0.05, 0.07, 0.10, 0.15)


def walk(steps: int = STEPS, size: int = SIZE, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(steps, size, generator=gen, dtype=torch.float64) * 0.1, 0).float().double()


def exact(thetas: Tensor, sigma_rel: float) -> Tensor:
    """The power-function EMA of width sigma_rel after every step of ``thetas`` (float64 closed form)."""
    return profile(len(thetas), sigma_rel_to_gamma(sigma_rel)) @ thetas


def _net(size: int) -> nn.Module:
    net = nn.Linear(size, 1, bias=False)
    return net


def _set(net: nn.Module, theta: Tensor) -> None:
    with torch.no_grad():
        net.weight.copy_(theta.view_as(net.weight))


def run_polyak(thetas: Tensor, directory: Path, every: int = EVERY) -> dict[float, Tensor]:
    net = _net(thetas.shape[1])
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=every, directory=directory)
    for theta in thetas:
        _set(net, theta)
        ph.update()
    return {s: ph.synthesize(s)["weight"].double().reshape(-1) for s in WIDTHS}


def reported_errors(steps: int = STEPS, every: int = EVERY) -> dict[float, float]:
    """polyak's own relative profile error for each width (``PostHocEMA.weights(...).error``)."""
    from polyak.posthoc import solve

    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    stored = [(t, g) for t in range(every, steps + 1, every) for g in gammas]
    return {s: solve(stored, (steps, sigma_rel_to_gamma(s))).error for s in WIDTHS}


def run_ema_pytorch(thetas: Tensor, directory: Path, every: int = EVERY, **kwargs: Any) -> dict[float, Tensor]:
    from ema_pytorch import PostHocEMA as PeerPostHocEMA

    net = _net(thetas.shape[1])
    ph = PeerPostHocEMA(
        net, sigma_rels=(0.05, 0.10), checkpoint_every_num_steps=every, checkpoint_folder=str(directory), **kwargs
    )
    for theta in thetas:
        _set(net, theta)
        ph.update()
    out = {}
    for s in WIDTHS:
        synth = ph.synthesize_ema_model(sigma_rel=s)
        out[s] = synth.ema_model.weight.detach().double().reshape(-1)
    return out


def compare(steps: int = STEPS, every: int = EVERY, size: int = SIZE) -> dict[str, dict[float, tuple[float, float]]]:
    """{method: {sigma_rel: (relative L2 error on the walk, weight on theta_1)}}."""
    thetas = walk(steps, size)
    first = torch.zeros(steps, 4, dtype=torch.float64)
    first[0] = 1.0
    methods = {
        "polyak PostHocEMA": lambda t, d: run_polyak(t, d, every),
        "ema-pytorch, defaults": lambda t, d: run_ema_pytorch(t, d, every),
        "ema-pytorch, update_every=1": lambda t, d: run_ema_pytorch(t, d, every, update_every=1),
    }
    out: dict[str, dict[float, tuple[float, float]]] = {}
    for name, fn in methods.items():
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            got, spike = fn(thetas, Path(a)), fn(first, Path(b))
        out[name] = {
            s: (float((got[s] - exact(thetas, s)).norm() / exact(thetas, s).norm()), float(spike[s][0])) for s in WIDTHS
        }
    return out


def main() -> None:
    torch.manual_seed(0)
    thetas = walk()
    scale = float((exact(thetas, 0.05) - exact(thetas, 0.10)).norm() / exact(thetas, 0.10).norm())
    print(f"random walk: {STEPS} steps, {SIZE} weights, snapshots of sigma_rel 0.05 and 0.10 every {EVERY} steps")
    print(f"for scale: the exact EMAs of sigma_rel 0.05 and 0.10 differ by {scale:.2e} (relative L2)")
    print(f"{'method':32s} " + " ".join(f"{'rel.err ' + format(s, 'g'):>14s}" for s in WIDTHS))
    results = compare()
    for name, row in results.items():
        print(f"{name:32s} " + " ".join(f"{row[s][0]:14.2e}" for s in WIDTHS))
    reported = reported_errors()
    print(f"{'polyak: reported profile error':32s} " + " ".join(f"{reported[s]:14.2e}" for s in WIDTHS))
    print("weight on theta_1 (exact: (1/2000)^(gamma+1), below 1e-20 here)")
    for name, row in results.items():
        print(f"{name:32s} " + " ".join(f"{row[s][1]:14.1e}" for s in WIDTHS))


if __name__ == "__main__":
    main()
