"""What averaging adds to a real training step on CPU: a small CNN and a small transformer.

Each training step (forward, backward, AdamW step) is timed, then the ``ema.update()`` after it; the
overhead of a step is ``t_update / t_step``. Reported: median overhead over steps, its spread
(p25..p75), and the median ms per step and per update. Configurations: polyak's default (``nonfinite="raise"``), ``nonfinite="ignore"``,
and four decays at once (K=4).

Usage: python benchmarks/bench_train_step.py [--steps 30] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
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
    x = torch.randn(32, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
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
    steps: int,
) -> dict[str, Any]:
    """Time each training step and the ``ema.update()`` that follows it separately, step by step; the
    overhead of a step is ``t_update / t_step``. (Timing whole blocks with and without averaging was
    tried first: on a shared 2-core machine the step time drifts by more than the update costs.)"""
    from polyak import EMA

    torch.manual_seed(0)
    model, loss_fn = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, **ema_kwargs)
    step_s, update_s, ratios = [], [], []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()
        t1 = time.perf_counter()
        ema.update()
        t2 = time.perf_counter()
        if i >= 3:  # warm-up steps excluded
            step_s.append(t1 - t0)
            update_s.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
    q = statistics.quantiles(ratios, n=4)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": len(list(model.parameters())),
        "ms_per_step": 1e3 * statistics.median(step_s),
        "ms_per_update": 1e3 * statistics.median(update_s),
        "overhead": statistics.median(ratios),
        "overhead_p25": q[0],
        "overhead_p75": q[2],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs: dict[str, dict[str, Any]] = {
        "polyak (default)": {"decay": 0.999},
        "polyak nonfinite='ignore'": {"decay": 0.999, "nonfinite": "ignore"},
        "polyak K=4": {"decay": [0.99, 0.999, 0.9999, 0.99999]},
    }
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    print("| model | configuration | ms/step | ms/update | overhead (p25..p75) |\n|---|---|---|---|---|")
    for name, make in [("small CNN", small_cnn), ("small transformer", small_transformer)]:
        report["models"][name] = {}
        for label, kwargs in configs.items():
            r = measure(make, kwargs, args.steps)
            report["models"][name][label] = r
            print(
                f"| {name} ({r['params'] / 1e6:.2f}M params, {r['tensors']} tensors) | {label} | "
                f"{r['ms_per_step']:.1f} | {r['ms_per_update']:.2f} | "
                f"{100 * r['overhead']:+.1f}% ({100 * r['overhead_p25']:+.1f}..{100 * r['overhead_p75']:+.1f}%) |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
