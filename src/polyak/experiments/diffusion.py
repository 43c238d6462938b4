"""A DDPM denoiser on the 2-D swiss roll, scored by the energy distance of its samples to held-out data.

Model (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps``, an MLP predicts ``eps`` from ``(x_t, t)``, trained on ``|eps_hat - eps|^2`` with
``t`` uniform in ``1..T``; the cosine schedule ``abar_t = cos^2((t/T + s)/(1 + s) * pi/2)`` of Nichol &
Dhariwal 2021 (s = 0.008, beta clipped at 0.999); ancestral sampling with the posterior variance
``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``.

Metric: the energy distance (Szekely & Rizzo 2013) ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between
generated samples X and held-out points Y, with unbiased (U-statistic) within-sample terms; it is 0 in
expectation exactly when the two distributions are equal. Every model of one seed is sampled from the
same noise (common random numbers), so differences between raw and averaged weights are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SwissRollDiffusion", "cosine_alpha_bar", "energy_distance"]


def cosine_alpha_bar(steps: int, s: float = 0.008) -> Tensor:
    """``abar_t`` for ``t = 0..steps`` (float64), with ``beta_t = 1 - abar_t / abar_{t-1}`` clipped at
    0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean), within-sample means over distinct pairs."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


class _Denoiser(nn.Module):
    """MLP ``(x_t, sinusoidal features of t/T) -> eps_hat`` with SiLU."""

    def __init__(self, hidden: Sequence[int], freqs: int = 8) -> None:
        super().__init__()
        self.freqs: Tensor
        self.register_buffer("freqs", torch.exp(torch.arange(freqs) * math.log(100.0) / max(freqs - 1, 1)))
        layers: list[nn.Module] = []
        width = 2 + 2 * freqs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angle = t.unsqueeze(1) * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], 1))  # type: ignore[no-any-return]


class SwissRollDiffusion:
    """The ``swissroll`` task of seed ``seed``: train/val/test points drawn by
    ``make_swiss_roll(noise=0.5, random_state=seed)`` (x and z coordinates, standardised on train)."""

    metric = "energy distance"

    def __init__(
        self,
        seed: int,
        hidden: Sequence[int] = (64, 64, 64),
        batch_size: int = 128,
        *,
        n_train: int = 2000,
        n_eval: int = 1000,
        steps: int = 50,
    ) -> None:
        from sklearn.datasets import make_swiss_roll

        points, _ = make_swiss_roll(n_train + 2 * n_eval, noise=0.5, random_state=seed)
        xz = points[:, [0, 2]]
        train = xz[:n_train]
        xz = (xz - train.mean(0)) / train.std()
        data = torch.tensor(xz, dtype=torch.float32)
        self.train, self.val, self.test = data[:n_train], data[n_train : n_train + n_eval], data[n_train + n_eval :]
        self.hidden, self.batch_size, self.steps, self.seed = tuple(hidden), batch_size, steps, seed
        abar = cosine_alpha_bar(steps)
        self.abar = abar.float()
        self.beta = (1 - abar[1:] / abar[:-1]).float()  # beta_t at index t - 1
        self.posterior_std = (self.beta * (1 - abar[:-1]).float() / (1 - abar[1:]).float()).sqrt()
        # fixed evaluation noise: the same for every model of this seed
        g = torch.Generator().manual_seed(10_000 + seed)
        self._eval_noise = {
            part: (torch.randn(n_eval, 2, generator=g), torch.randn(steps, n_eval, 2, generator=g))
            for part in ("val", "test")
        }
        self._loss_draws = {
            part: (torch.randint(1, steps + 1, (n_eval,), generator=g), torch.randn(n_eval, 2, generator=g))
            for part in ("val", "test")
        }

    def model(self) -> nn.Module:
        return _Denoiser(self.hidden)

    def batch(self, gen: torch.Generator) -> Tensor:
        return self.train[torch.randint(len(self.train), (self.batch_size,), generator=gen)]

    def _denoising_loss(self, model: nn.Module, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = self.abar[t].unsqueeze(1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return nn.functional.mse_loss(model(xt, t.float() / self.steps), eps)

    def loss(self, model: nn.Module, batch: Tensor, gen: torch.Generator) -> Tensor:
        t = torch.randint(1, self.steps + 1, (len(batch),), generator=gen)
        return self._denoising_loss(model, batch, t, torch.randn(batch.shape, generator=gen))

    @torch.no_grad()
    def sample(self, model: nn.Module, start: Tensor, noise: Tensor) -> Tensor:
        """Ancestral DDPM sampling from ``x_T = start`` with per-step noise ``noise[T - t]``."""
        x = start
        for t in range(self.steps, 0, -1):
            eps = model(x, torch.full((len(x),), t / self.steps))
            beta, abar = self.beta[t - 1], self.abar[t]
            x = (x - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
            if t > 1:
                x = x + self.posterior_std[t - 1] * noise[self.steps - t]
        return x

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, ref in (("val", self.val), ("test", self.test)):
            start, noise = self._eval_noise[part]
            out[part] = energy_distance(self.sample(model, start, noise), ref)
            t, eps = self._loss_draws[part]
            out[f"{part}_loss"] = float(self._denoising_loss(model, ref, t, eps))
        return out
