"""Time one EMA update: the default path vs ``EMA(capturable=True)`` run eagerly (and, with ``--compile``,
compiled by inductor with ``fullgraph=True``).

Eagerly, the capturable update launches a few dozen tiny ops to compute the decay on the device; that is
the price of an update that a CUDA graph can replay. On CPU there is no graph to amortise it, so this
measures the overhead only (an upper bound: inside a CUDA graph the launches cost ~nothing).

Layouts: ``small`` (a 2-layer MLP with BatchNorm: 8 tensors, 8.6K floats: overhead-bound) and ``mlp``
(24 ``Linear(512, 512)``: 48 tensors, 6.3M floats: bandwidth-bound). Configuration: 3 decays (ultralytics,
inverse_gamma, constant), ``debias=True``, the default NaN check. Implementations run
interleaved in rounds (shuffled each round); reported: median microseconds per update.

Usage: python benchmarks/bench_capturable.py [--rounds 15] [--updates 20] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from polyak import EMA, schedules


def layout(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "small":
        return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64))
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])


def build(model: nn.Module, capturable: bool) -> EMA:
    decay = [schedules.ultralytics(0.999, tau=2000), schedules.inverse_gamma(0.9999), 0.999]
    return EMA(model, decay=decay, debias=True, capturable=capturable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--updates", type=int, default=20, help="updates per implementation per round")
    parser.add_argument("--compile", action="store_true", help="also time the inductor-compiled update")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.updates} updates"
    )
    for name in ("small", "mlp"):
        base = layout(name)
        impls: dict[str, Callable[[], None]] = {
            "default": build(copy.deepcopy(base), False).update,
            "capturable eager": build(copy.deepcopy(base), True).update,
        }
        if args.compile:
            ema = build(copy.deepcopy(base), True)
            compiled = torch.compile(ema.update, fullgraph=True)
            t0 = time.perf_counter()
            compiled()
            print(f"  {name}: inductor compile {time.perf_counter() - t0:.1f} s")
            impls["capturable compiled"] = compiled
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(args.rounds):
            order = list(impls)
            random.shuffle(order)
            for key in order:
                fn = impls[key]
                fn()
                t0 = time.perf_counter()
                for _ in range(args.updates):
                    fn()
                times[key].append((time.perf_counter() - t0) / args.updates * 1e6)
        numel = sum(p.numel() for p in base.parameters())
        print(f"{name} ({len(list(base.parameters()))} parameter tensors, {numel:,} floats):")
        ref = statistics.median(times["default"])
        for key, values in times.items():
            med = statistics.median(values)
            print(f"  {key:22s} {med:10.1f} us/update   x{med / ref:5.2f} of default")


if __name__ == "__main__":
    main()
