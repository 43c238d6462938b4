"""Save and resume training with an EMA, exactly: model, optimizer, every average, and the RNG.

Run: ``python examples/checkpoint_resume.py [--dir DIR]``; then try ``polyak inspect DIR/run.safetensors``.
The script trains 20 steps in one go and 10 + 10 steps with a save/load in between (fresh objects, as
after a restart), and checks that the two runs agree bit for bit.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import polyak


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, polyak.EMA]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = polyak.EMA(model, decay=[0.99, 0.999])
    return model, optimizer, ema


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ema: polyak.EMA, steps: range) -> None:
    data = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(20, 64, 8, generator=data), torch.randn(20, 64, 1, generator=data)
    model.train()
    for step in steps:
        loss = nn.functional.mse_loss(model(xs[step]), ys[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.mkdtemp(prefix="polyak-")))
    args = parser.parse_args()
    path = args.dir / "run.safetensors"

    torch.manual_seed(1)
    reference = build(0)
    train(*reference, range(20))

    torch.manual_seed(1)
    model, optimizer, ema = build(0)
    train(model, optimizer, ema, range(10))
    polyak.save(path, ema, model=model, optimizer=optimizer, extra={"step": 10, "rng": torch.get_rng_state()})

    model, optimizer, ema = build(123)  # a new process: other weights, other random state
    ckpt = polyak.load(path, ema, model=model, optimizer=optimizer)
    torch.set_rng_state(ckpt.extra["rng"])
    train(model, optimizer, ema, range(ckpt.extra["step"], 20))

    same = all(torch.equal(a, b) for a, b in zip(reference[0].state_dict().values(), model.state_dict().values()))
    for index in range(ema.num_averages):
        ours, theirs = ema.averaged_state_dict(index), reference[2].averaged_state_dict(index)
        same = same and all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f"checkpoint: {path}")
    print(f"resumed run equals the uninterrupted run bit for bit: {same}")


if __name__ == "__main__":
    main()
