"""``polyak demo``: train a small MLP on ``make_regression`` with and without EMA; print test MSE."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="raw vs averaged weights on a small regression MLP", description=__doc__
    )
    p.add_argument("--out", default="reports/demo", help="report directory (default: reports/demo)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default: 5)")
    p.add_argument("--epochs", type=int, default=60, help="epochs per run (default: 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from polyak import EMA

    try:
        from sklearn.datasets import make_regression
    except ImportError as exc:  # pragma: no cover - the [experiments] extra is missing
        raise ValueError("polyak demo needs scikit-learn: pip install 'polyak[experiments]'") from exc
    if args.seeds < 1 or args.epochs < 1:
        raise ValueError("--seeds and --epochs must be >= 1")

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    print(f"{'seed':>4} {'raw test MSE':>14} {'EMA test MSE':>14}")
    raw_all, ema_all = [], []
    for seed in range(args.seeds):
        x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=seed)
        xt = torch.tensor(x, dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
        xt = (xt - xt[:700].mean(0)) / xt[:700].std(0)
        yt = (yt - yt[:700].mean()) / yt[:700].std()
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 1),
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ema = EMA(model, decay=0.99)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(args.epochs):
            perm = torch.randperm(700, generator=gen)
            for i in range(0, 700, 32):
                idx = perm[i : i + 32]
                loss = torch.nn.functional.mse_loss(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                ema.update()
        with torch.no_grad():
            raw = torch.nn.functional.mse_loss(model(xt[850:]), yt[850:]).item()
            with ema.apply():
                avg = torch.nn.functional.mse_loss(model(xt[850:]), yt[850:]).item()
        raw_all.append(raw)
        ema_all.append(avg)
        print(f"{seed:>4} {raw:>14.5f} {avg:>14.5f}")
    mean_raw = sum(raw_all) / len(raw_all)
    mean_ema = sum(ema_all) / len(ema_all)
    wins = sum(a < r for a, r in zip(ema_all, raw_all))
    print(f"mean {mean_raw:>14.5f} {mean_ema:>14.5f}   (EMA better on {wins}/{len(raw_all)} seeds)")
    return 0
