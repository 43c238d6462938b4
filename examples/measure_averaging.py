"""Measure whether weight averaging helps on YOUR model: several seeds, paired statistics.

Each seed trains one model; one ``EMA`` keeps several decays at once, so raw and every average are read
off the same run (a paired comparison). Replace ``make_data`` and ``make_model`` with your own.
Run: ``python examples/measure_averaging.py`` (needs ``pip install 'polyak[experiments]'``; ~10 s on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from polyak import EMA
from polyak.experiments.stats import paired_comparison

DECAYS = [0.9, 0.99]


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 10, generator=gen)
    y = torch.sin(x[:, :1] * 2) + 0.3 * x[:, 1:2] + 0.1 * torch.randn(600, 1, generator=gen)
    return x[:500], y[:500], x[500:], y[500:]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))


def run(seed: int, epochs: int = 30) -> tuple[float, list[float]]:
    """Test MSE of the raw model and of each average after ``epochs`` epochs."""
    x, y, x_test, y_test = make_data(seed)
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=DECAYS)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            ema.update()
    with torch.no_grad():
        raw = float(nn.functional.mse_loss(model(x_test), y_test))
        averaged = []
        for k in range(len(DECAYS)):
            with ema.apply(index=k):
                averaged.append(float(nn.functional.mse_loss(model(x_test), y_test)))
    return raw, averaged


def main() -> None:
    torch.set_num_threads(1)
    results = [run(seed) for seed in range(10)]
    raw = [r for r, _ in results]
    for k, decay in enumerate(DECAYS):
        c = paired_comparison([a[k] for _, a in results], raw, higher_is_better=False)
        print(
            f"decay {decay}: test MSE {c.raw.mean:.4f} -> {c.averaged.mean:.4f} ({100 * c.relative_change:+.1f}%), "
            f"95% CI of the difference [{c.ci95_low:+.4f}, {c.ci95_high:+.4f}], t-test p {c.t_pvalue:.2g}, "
            f"Wilcoxon p {c.wilcoxon_pvalue:.2g}, wins/ties/losses {c.wins}/{c.ties}/{c.losses}"
        )


if __name__ == "__main__":
    main()
