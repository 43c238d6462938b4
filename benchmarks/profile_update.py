"""Where the time of one default ``EMA(model, 0.999).update()`` goes, phase by phase, on the layouts of
``bench_update.py``, beside the memory passes that bound it.

Phases (the data flow in ``docs/architecture.md``): ``watch`` (has the model changed: registration
generation, watched slots, each reader's ``moved()``), ``decide`` (the float decision), ``read`` (the
group's flat source: a gather for many small tensors, nothing for large ones), ``check`` (the host
finiteness verdict; beside it the earlier screen, one ``sum`` per tensor), ``lerp`` (the kernels) and ``advance`` (the counters). Each phase runs with the
same arguments as inside ``update()``; all of them and the whole update are interleaved in rounds, so
their medians are comparable. Reference passes over the same weights laid flat: ``flat sum`` (reading
each weight once: what the check costs when it is a separate pass; ``flat dot``, the same read through
BLAS), ``flat lerp`` (the update's own
traffic) and ``flat sum + lerp`` (both passes, what any design that decides before writing pays when
the weights do not fit in the cache).

Usage: python benchmarks/profile_update.py [--shapes resnet50,gpt,many_small] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_update import DECAY, build  # noqa: E402


def phases(shape: str) -> dict[str, Callable[[], object]]:
    from polyak import EMA, _kernels
    from polyak._counters import advance
    from polyak._decide import decide

    model = build(shape)
    ema = EMA(model, DECAY)
    for _ in range(2):
        ema.update()
    groups = ema._groups
    sources = [g.reader.read() for g in groups]
    decision = decide(ema.schedules, 5, 0, 1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shadow = flat.clone()

    def watch() -> None:
        ema._watch.check()
        for g in groups:
            g.reader.moved()

    def check() -> None:
        for g, src in zip(groups, sources):
            _kernels.finite_on_host(g.sources if src is None else [src])

    def check_sums() -> None:  # the previous screen: one sum per tensor, a Python loop
        for g, src in zip(groups, sources):
            parts = g.sources if src is None else [src]
            bool(torch.isfinite(torch.stack([t.sum() for t in parts])).all())

    def lerp() -> None:
        for g, src in zip(groups, sources):
            _kernels.lerp_shadows_(g.views, g.flat, g.sources, src, decision.weights, None)

    return {
        "update()": ema.update,
        "watch": watch,
        "decide": lambda: decide(ema.schedules, 5, 0, 1),
        "read": lambda: [g.reader.read() for g in groups],
        "check": check,
        "check, one sum per tensor": check_sums,
        "lerp": lerp,
        "advance": lambda: advance(ema._counters, decision, True),
        "flat sum": lambda: flat.sum(),
        "flat dot": lambda: torch.dot(flat, flat),
        "flat lerp": lambda: shadow.lerp_(flat, 1 - DECAY),
        "flat sum + lerp": lambda: (bool(flat.sum().isfinite()), shadow.lerp_(flat, 1 - DECAY)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="resnet50,gpt,many_small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes.split(","):
        fns = phases(shape)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
        total = med["update()"]
        print(f"\n{shape}\n| phase | ms | of update() |\n|---|---|---|")
        for name, ms in med.items():
            print(f"| {name} | {ms:.3f} | {ms / total:.0%} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
