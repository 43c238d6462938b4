"""The generative tasks: the DDPM pieces against closed forms and scipy, the character LM's bits per
character against exact values, and the shared training loop on tiny sizes."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from polyak import EMA
from polyak.experiments.charlm import VOCAB, StdlibCharLM, stdlib_text
from polyak.experiments.diffusion import SwissRollDiffusion, cosine_alpha_bar, energy_distance
from polyak.experiments.runner import AverageSpec, RunConfig, train_seed
from polyak.experiments.tasks import build_task, train_task

TINY_DIFFUSION = {"n_train": 64, "n_eval": 32, "steps": 5}
TINY_TEXT = {"eval_chars": 260, "context": 12, "heads": 2}


def test_energy_distance_matches_scipy_in_1d_and_a_brute_force_sum_in_2d():
    from scipy.stats import energy_distance as scipy_energy

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 1)), rng.normal(0.5, 2.0, size=(30, 1))
    ours = energy_distance(torch.tensor(x), torch.tensor(y))
    # scipy: sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) with within-sample means over all n^2 pairs (zeros included)
    n, m = len(x), len(y)
    xx = np.abs(x - x.T).sum()
    yy = np.abs(y - y.T).sum()
    v_stat = ours + xx / (n * (n - 1)) - xx / n**2 + yy / (m * (m - 1)) - yy / m**2
    assert v_stat == pytest.approx(scipy_energy(x[:, 0], y[:, 0]) ** 2, rel=1e-12)

    a, b = rng.normal(size=(7, 2)), rng.normal(size=(5, 2))
    cross = sum(np.linalg.norm(p - q) for p in a for q in b) / 35
    within_a = sum(np.linalg.norm(a[i] - a[j]) for i in range(7) for j in range(7) if i != j) / 42
    within_b = sum(np.linalg.norm(b[i] - b[j]) for i in range(5) for j in range(5) if i != j) / 20
    assert energy_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(2 * cross - within_a - within_b)


def test_energy_distance_is_unbiased_for_equal_distributions_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    same = [energy_distance(torch.randn(60, 2, generator=gen), torch.randn(60, 2, generator=gen)) for _ in range(300)]
    assert abs(np.mean(same)) < 3 * np.std(same) / math.sqrt(len(same))
    x = torch.randn(200, 2, generator=gen)
    shifts = [energy_distance(x, torch.randn(200, 2, generator=gen) + d) for d in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts)
    assert shifts[0] > 0.1


def test_cosine_schedule_matches_nichol_dhariwal():
    abar = cosine_alpha_bar(50)
    f = [math.cos((t / 50 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(51)]
    beta = [min(1 - (f[t] / f[0]) / (f[t - 1] / f[0]), 0.999) for t in range(1, 51)]
    assert abar[0] == 1.0
    assert abar[1:].tolist() == pytest.approx(np.cumprod([1 - b for b in beta]).tolist(), rel=1e-12)
    assert max(beta) == 0.999  # the last step is clipped


class _GaussianOracle(nn.Module):
    """The exact eps prediction E[eps | x_t] for data N(0, s^2 I): sqrt(1 - a) x_t / (a s^2 + 1 - a)."""

    def __init__(self, abar: torch.Tensor, steps: int, s: float) -> None:
        super().__init__()
        self.abar, self.steps, self.s = abar, steps, s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[torch.round(t * self.steps).long()].unsqueeze(1)
        return (1 - a).sqrt() * x / (a * self.s**2 + 1 - a)


def _sampler_variance(abar: list[float], s: float) -> float:
    """Closed form of the ancestral sampler's output variance with the exact denoiser for N(0, s^2) data:
    the sampler is linear, x_{t-1} = c_t x_t + sigma_t z, so Var_{t-1} = c_t^2 Var_t + sigma_t^2."""
    steps = len(abar) - 1
    var = 1.0
    for t in range(steps, 0, -1):
        a, beta = abar[t], 1 - abar[t] / abar[t - 1]
        k = math.sqrt(1 - a) / (a * s**2 + 1 - a)  # eps_hat = k x_t
        c = (1 - beta / math.sqrt(1 - a) * k) / math.sqrt(1 - beta)
        posterior = beta * (1 - abar[t - 1]) / (1 - a) if t > 1 else 0.0
        var = c * c * var + posterior
    return var


@pytest.mark.parametrize("s", [0.3, 1.0, 2.0])
def test_ddpm_sampler_with_the_exact_denoiser_matches_its_closed_form(s):
    task = SwissRollDiffusion(0, (8,), 16, n_train=64, n_eval=8, steps=50)
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    oracle = _GaussianOracle(task.abar, 50, s)
    out = task.sample(oracle, torch.randn(n, 2, generator=gen), torch.randn(50, n, 2, generator=gen))
    expected = math.sqrt(_sampler_variance(task.abar.double().tolist(), s))
    assert out.std(0).tolist() == pytest.approx([expected, expected], rel=0.02)  # Monte Carlo: ~0.5%
    assert expected == pytest.approx(s, rel=0.12)  # and the sampler nearly recovers the data's scale
    assert out.mean(0).abs().max() < 0.05 * s


def test_swissroll_data_depends_on_the_seed_only_and_evaluation_is_deterministic():
    a, b, c = (SwissRollDiffusion(k, (8,), 16, **TINY_DIFFUSION) for k in (0, 0, 1))
    assert torch.equal(a.train, b.train)
    assert not torch.equal(a.train, c.train)
    assert a.train.mean(0).abs().max() < 1e-5  # standardised on train
    torch.manual_seed(0)
    model = a.model().eval()
    assert a.evaluate(model) == a.evaluate(model)


def test_bits_per_character_of_a_uniform_predictor_is_exactly_8():
    class Uniform(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*tokens.shape, VOCAB)

    metrics = StdlibCharLM(0, (8, 1), 4, **TINY_TEXT).evaluate(Uniform())
    assert metrics["val"] == pytest.approx(8.0, abs=1e-5)
    assert metrics["test"] == pytest.approx(8.0, abs=1e-5)
    assert metrics["val_loss"] == pytest.approx(math.log(256), abs=1e-5)


def test_the_language_model_is_causal():
    torch.manual_seed(0)
    model = StdlibCharLM(0, (16, 2), 4, **TINY_TEXT).model().eval()
    tokens = torch.randint(256, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_stdlib_text_splits_without_overlap():
    task = StdlibCharLM(0, (8, 1), 4, context=12, heads=2, eval_chars=10**9)
    text = stdlib_text()
    n_val = len(text) - len(task.train)
    assert len(task.train) == int(0.9 * len(text))
    held = sum(w.numel() for w in task.held_out.values())
    assert held <= n_val
    assert bytes(task.held_out["test"][-1].tolist()) in text[len(task.train) :]


def _tiny(dataset: str, averages: tuple[AverageSpec, ...], **kw: object) -> RunConfig:
    hidden, batch, task = ((8,), 16, TINY_DIFFUSION) if dataset == "swissroll" else ((8, 1), 4, TINY_TEXT)
    return RunConfig(dataset, hidden, averages, 2, batch_size=batch, extra={"steps_per_epoch": 3, "task": task}, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("dataset", ["swissroll", "stdlib-text"])
def test_train_task_is_reproducible_and_reads_every_average(dataset):
    specs = (
        AverageSpec("c", decay=0.9),
        AverageSpec("p", "power_function", gamma=6.94),
        AverageSpec("d", decay=0.99, debias=True),
    )
    cfg = _tiny(dataset, specs, swa_start=0.5)
    a = train_seed(cfg, 3)
    assert a["steps"] == 6
    assert set(a["curves"]) == {"raw", "c", "p", "d", "swa"}
    assert all(len(v) == 2 for curve in a["curves"].values() for v in curve.values())
    assert train_task(cfg, 3)["curves"] == a["curves"]
    assert train_task(cfg, 4)["curves"] != a["curves"]


def test_train_task_averages_equal_a_hand_run_of_the_same_steps():
    """The debias average read by the loop equals an EMA(debias=True) run by hand over the same steps."""
    cfg = _tiny("swissroll", (AverageSpec("c", decay=0.5), AverageSpec("d", decay=0.9, debias=True)))
    result = train_task(cfg, 0)
    task = build_task(cfg, 0)
    torch.manual_seed(0)
    model = task.model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, decay=0.9, debias=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        loss = task.loss(model, task.batch(gen), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    with ema.apply():
        model.eval()
        assert task.evaluate(model)["test"] == result["curves"]["d"]["test"][-1]


def test_unknown_task_and_bad_text_model_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task(replace(_tiny("swissroll", ()), dataset="nope"), 0)
    with pytest.raises(ValueError, match=r"hidden must be \(width, layers\)"):
        StdlibCharLM(0, (8,), 4)
    with pytest.raises(ValueError, match="debias=True averages are run by the generative tasks only"):
        train_seed(RunConfig("regression", (8,), (AverageSpec("d", debias=True),), 2, num_samples=60), 0)
