"""Post-hoc EMA: train once, choose the averaging width afterwards.

    python examples/posthoc_ema.py --out runs/posthoc            # train, snapshot, pick the best width
    polyak posthoc runs/posthoc/snapshots --sigma-rel 0.07 -o model.safetensors --plot profiles.png

A small MLP learns a noisy regression problem generated on the spot (no download) with a large SGD step.
``PostHocEMA`` keeps power-function EMAs of sigma_rel 0.05 and 0.10 and snapshots them every 100 steps;
after training, a grid of widths is synthesised from the snapshots and evaluated on a validation split,
each with the relative error of its averaging profile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from polyak import PostHocEMA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/posthoc", help="run folder (snapshots go to OUT/snapshots)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshot-every", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    y = torch.sin(x @ torch.randn(16, 1)) + 0.3 * torch.randn(4096, 1)
    x_val, y_val, x_train, y_train = x[:1024], y[:1024], x[1024:], y[1024:]
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    posthoc = PostHocEMA(
        model, (0.05, 0.10), snapshot_every=args.snapshot_every, directory=Path(args.out) / "snapshots"
    )

    for _ in range(args.steps):
        idx = torch.randint(0, len(x_train), (32,))
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        posthoc.update()
    if posthoc.step % args.snapshot_every:
        posthoc.snapshot()

    def val_mse(net: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(net(x_val), y_val))

    twin = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    print(f"raw model: val MSE {val_mse(model):.4f}")
    for sigma in (0.02, 0.05, 0.07, 0.10, 0.15, 0.25):
        weights = posthoc.weights(sigma)
        posthoc.copy_to(twin, sigma)
        print(f"sigma_rel {sigma:<5g} val MSE {val_mse(twin):.4f}   profile error {weights.error:.1e}")


if __name__ == "__main__":
    main()
