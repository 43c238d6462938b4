"""Evaluate the average without a swap: ``ema.module()(x)`` vs ``with ema.apply(): model(x)``, and the
cost of building the module vs ``copy.deepcopy(model)`` (what timm/Ultralytics do to get an EMA module).

``apply()`` copies the averaged weights into the live model and back (two copies of every averaged
tensor per evaluation); ``ema.module()`` is a module whose tensors are the shadows, so its forward is a
plain forward. Building it copies the module tree but no tensor. Model: ``--layers`` x ``Linear(width,
width)``, batch ``--batch``; implementations interleaved in rounds; reported: median milliseconds and
ratios measured in the same run.

Usage: python benchmarks/bench_module.py [--layers 4] [--width 2048] [--batch 8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from polyak import EMA


def _median_ms(fn: Callable[[], object], rounds: int, repeat: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - start) / repeat * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU()) for _ in range(args.layers)])
    model.eval()
    ema = EMA(model, decay=0.999)
    x = torch.randn(args.batch, args.width)

    def build_module() -> None:
        ema.__dict__.pop("_modules_by_index", None)  # drop the cached module: measure a fresh build
        ema.module()

    def swap_forward() -> None:
        with ema.apply():
            model(x)

    with torch.no_grad():
        t_deepcopy = _median_ms(lambda: copy.deepcopy(model), args.rounds, 3)
        t_build = _median_ms(build_module, args.rounds, 3)
        averaged = ema.module()
        t_swap = _median_ms(swap_forward, args.rounds, 10)
        t_module = _median_ms(lambda: averaged(x), args.rounds, 10)
        t_live = _median_ms(lambda: model(x), args.rounds, 10)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {params / 1e6:.1f}M parameters, batch {args.batch}, median of {args.rounds} rounds"
    )
    print(
        f"build:    copy.deepcopy(model) {t_deepcopy:8.2f} ms   ema.module() {t_build:8.2f} ms   ratio {t_deepcopy / t_build:5.1f}x"
    )
    print(
        f"evaluate: apply() + forward    {t_swap:8.2f} ms   module(x)    {t_module:8.2f} ms   ratio {t_swap / t_module:5.1f}x"
    )
    print(f"          live forward         {t_live:8.2f} ms")


if __name__ == "__main__":
    main()
