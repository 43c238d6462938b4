"""What averaging adds to a real training step on CPU: a small CNN and a small transformer.

Each round runs a block of training steps (forward, backward, AdamW step) without averaging and a block
with ``ema.update()`` after each step, in shuffled order; the overhead of a round is
``t_with / t_without - 1``. Reported: median overhead over rounds, its spread (p25..p75), and the
median ms per step. Configurations: polyak's default (``nonfinite="raise"``), ``nonfinite="ignore"``,
and four decays at once (K=4).

Usage: python benchmarks/bench_train_step.py [--rounds 15] [--steps 5] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def small_cnn() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(h, mask=mask, is_causal=True))


def small_transformer() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = TinyTransformer()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (16, 65), generator=gen)
    return model, lambda m: nn.functional.cross_entropy(m(tokens[:, :-1]).reshape(-1, 1000), tokens[:, 1:].reshape(-1))


def measure(
    make: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]],
    ema_kwargs: dict[str, Any],
    rounds: int,
    steps: int,
) -> dict[str, Any]:
    from polyak import EMA

    torch.manual_seed(0)
    model, loss_fn = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, **ema_kwargs)

    def block(with_ema: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
            if with_ema:
                ema.update()
        return (time.perf_counter() - t0) / steps

    block(False), block(True)  # warm-up
    rng = random.Random(0)
    overheads, plain, averaged = [], [], []
    for _ in range(rounds):
        order = [False, True]
        rng.shuffle(order)
        times = {w: block(w) for w in order}
        plain.append(times[False])
        averaged.append(times[True])
        overheads.append(times[True] / times[False] - 1.0)
    q = statistics.quantiles(overheads, n=4)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": len(list(model.parameters())),
        "ms_per_step_without": 1e3 * statistics.median(plain),
        "ms_per_step_with": 1e3 * statistics.median(averaged),
        "overhead": statistics.median(overheads),
        "overhead_p25": q[0],
        "overhead_p75": q[2],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    args = parser.parse_args(argv)
    configs: dict[str, dict[str, Any]] = {
        "polyak (default)": {"decay": 0.999},
        "polyak nonfinite='ignore'": {"decay": 0.999, "nonfinite": "ignore"},
        "polyak K=4": {"decay": [0.99, 0.999, 0.9999, 0.99999]},
    }
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    print("| model | configuration | ms/step without | ms/step with | overhead (p25..p75) |\n|---|---|---|---|---|")
    for name, make in [("small CNN", small_cnn), ("small transformer", small_transformer)]:
        report["models"][name] = {}
        for label, kwargs in configs.items():
            r = measure(make, kwargs, args.rounds, args.steps)
            report["models"][name][label] = r
            print(
                f"| {name} ({r['params'] / 1e6:.2f}M params, {r['tensors']} tensors) | {label} | "
                f"{r['ms_per_step_without']:.1f} | {r['ms_per_step_with']:.1f} | "
                f"{100 * r['overhead']:+.1f}% ({100 * r['overhead_p25']:+.1f}..{100 * r['overhead_p75']:+.1f}%) |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
