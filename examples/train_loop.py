"""Weight averaging in a plain PyTorch loop: train, evaluate raw and averaged weights, keep the best.

    python examples/train_loop.py --epochs 8 --out runs/loop        # with EMA (the default)
    python examples/train_loop.py --no-ema --out runs/loop-raw      # ablation: the same run without it

A small MLP (with BatchNorm) learns a noisy 10-class problem generated on the spot (no download) with a
deliberately large SGD step, the regime where an average of the weights beats the last iterate. The EMA
is updated by the optimizer's step hook (``polyak.integrations.loop.update_on_step``), so the loop body is
the usual one. After every epoch both the raw and the averaged weights are evaluated, and the checkpoint
with the best *averaged* validation accuracy is saved with everything needed to resume or deploy:
raw weights, optimizer, EMA state and the averaged weights as a plain ``state_dict``.
Runs in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyak import EMA, update_bn
from polyak.integrations.loop import update_on_step


def make_data(seed: int, n_train: int = 2000, n_val: int = 1000, dim: int = 20, classes: int = 10) -> tuple:
    """Gaussian clusters with 20% of the training labels flipped at random (noise the average smooths)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.2

    def sample(n: int, flip: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g) * 1.5
        noisy = torch.rand(n, generator=g) < flip
        y = torch.where(noisy, torch.randint(classes, (n,), generator=g), y)
        return x, y

    return sample(n_train, 0.2), sample(n_val, 0.0)


def make_model(dim: int = 20, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, classes))


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="train without averaging (ablation)")
    parser.add_argument("--update-bn", action="store_true", help="recompute BatchNorm statistics for the average")
    parser.add_argument("--out", type=Path, default=Path("runs/train_loop"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = make_data(args.seed)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=500)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ema = EMA(model, decay=args.decay) if args.ema else None
    hook = update_on_step(ema, optimizer) if ema is not None else None

    args.out.mkdir(parents=True, exist_ok=True)
    best: dict[str, Any] = {"epoch": -1, "metric": -1.0}
    history = []
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # the hook runs ema.update() right after
        raw = accuracy(model, val_loader)
        averaged, averaged_weights = None, None
        if ema is not None:
            with ema.apply():  # the live model holds the averaged weights inside; restored on exit
                if args.update_bn:
                    update_bn(train_loader, model)
                averaged = accuracy(model, val_loader)
                averaged_weights = {k: v.clone() for k, v in model.state_dict().items()}
        metric = averaged if averaged is not None else raw
        history.append({"epoch": epoch, "val_acc": raw, "val_acc_ema": averaged})
        shown = f"{averaged:.4f}" if averaged is not None else "-"
        print(f"epoch {epoch}: val_acc {raw:.4f}  val_acc_ema {shown}")
        if metric > best["metric"]:
            best = {"epoch": epoch, "metric": metric}
            checkpoint = {
                "epoch": epoch,
                "metric": metric,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "averaged_model": averaged_weights,  # a plain state_dict: load it into make_model() to deploy
            }
            torch.save(checkpoint, args.out / "best.pt")
    if hook is not None:
        hook.remove()
    summary = {"best_epoch": best["epoch"], "best_metric": best["metric"], "history": history}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"best epoch {best['epoch']} ({'averaged' if ema else 'raw'} val_acc {best['metric']:.4f}) -> {args.out}")
    return summary


if __name__ == "__main__":
    main()
