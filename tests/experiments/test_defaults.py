"""``polyak experiment defaults``: the candidates, the win/tie/loss tally and the rule that picks the
default, on hand-made results with known answers, and a tiny end-to-end run."""

import json
import math
from dataclasses import replace

import pytest

from polyak import schedules
from polyak.cli import main
from polyak.experiments import defaults
from polyak.experiments.report import write_experiment
from polyak.experiments.suite import Options, build_arms, run_arms


def _sigma_rel(gamma: float) -> float:
    """EDM2 eq. 4: the relative width of the power-function profile with exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_gives_edm2s_pairs_and_inverts_the_width(sigma_rel, gamma):
    got = defaults.sigma_rel_to_gamma(sigma_rel)
    assert got == pytest.approx(gamma, abs=0.005)  # the pairs quoted in the EDM2 paper
    assert _sigma_rel(got) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31])  # the widest profile has sigma_rel 0.3003
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        defaults.sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rel must be finite"):
        defaults.sigma_rel_to_gamma(float("nan"))
    with pytest.raises(TypeError, match="sigma_rel must be a real number"):
        defaults.sigma_rel_to_gamma(True)


def test_candidates_are_the_schedules_they_name():
    specs = {a.name: a for a in defaults.candidates()}
    assert specs["constant 0.9999"].schedule() == schedules.constant(0.9999)
    assert specs["constant 0.9999, debias"].debias
    assert specs["inverse-gamma warm-up"].schedule() == schedules.inverse_gamma(0.9999)
    assert specs["Ultralytics tau=2000"].schedule() == schedules.ultralytics(0.9999, 2000.0)
    power = specs["power sigma_rel=0.1"].schedule()
    assert isinstance(power, schedules.power_function)
    assert _sigma_rel(power.gamma) == pytest.approx(0.1, rel=1e-4)
    assert defaults.CURRENT_DEFAULT in specs


def _results(finals: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, object]]:
    """Hand-made results: ``finals[setting][model]`` = the last test value of each seed."""
    out: dict[str, dict[str, object]] = {}
    for label, models in finals.items():
        names = [m for m in models if m != "raw"]
        seeds = [
            {"seed": k, "steps": 10, "curves": {m: {"test": [v[k]]} for m, v in models.items()}}
            for k in range(len(models["raw"]))
        ]
        out[label] = {"config": {"averages": [{"name": n} for n in names]}, "seeds": seeds}
    return out


RAW = [1.0, 1.2, 0.9, 1.1, 1.0, 0.95]


def _shift(delta: float, jitter: float = 0.01, seed: int = 0) -> list[float]:
    """RAW moved by ``delta`` plus a small per-seed jitter (a different one per ``seed``, so that no two
    candidates differ by an exact constant)."""
    import random

    rng = random.Random(seed)
    return [r + delta + jitter * rng.uniform(-1, 1) for r in RAW]


def test_tally_counts_wins_ties_losses_against_raw_and_the_best():
    results = _results(
        {
            "one": {"raw": RAW, "good": _shift(-0.2, seed=1), "risky": _shift(-0.3, seed=2), "same": _shift(0, 0.1, 3)},
            "two": {"raw": RAW, "good": _shift(-0.1, seed=4), "risky": _shift(0.4, seed=5), "same": _shift(0, 0.1, 6)},
        }
    )
    a = defaults.analyse_defaults(results)
    t = a["tally"]
    assert (t["good"]["raw_wins"], t["good"]["raw_ties"], t["good"]["raw_losses"]) == (2, 0, 0)
    assert (t["risky"]["raw_wins"], t["risky"]["raw_ties"], t["risky"]["raw_losses"]) == (1, 0, 1)
    assert (t["same"]["raw_wins"], t["same"]["raw_ties"], t["same"]["raw_losses"]) == (0, 2, 0)
    assert a["settings"]["one"]["best"] == "risky"
    assert a["settings"]["two"]["best"] == "good"
    assert (t["good"]["best"], t["good"]["best_losses"]) == (1, 1)
    assert (t["risky"]["best"], t["risky"]["best_losses"]) == (1, 1)
    # risky wins once but loses once against raw: the rule takes the never-worse one with most wins
    assert a["choice"] == "good"


def test_no_candidate_that_is_never_worse_keeps_the_current_default():
    results = _results({"one": {"raw": RAW, "a": _shift(0.3, seed=1), "b": _shift(0.2, seed=2)}})
    assert defaults.analyse_defaults(results)["choice"] == defaults.CURRENT_DEFAULT


def test_ties_in_wins_are_broken_by_closeness_to_the_best():
    tally = {
        "x": {"raw_wins": 2, "raw_losses": 0, "best": 0, "best_ties": 1, "mean_rank": 2.0},
        "y": {"raw_wins": 2, "raw_losses": 0, "best": 1, "best_ties": 1, "mean_rank": 2.5},
        "z": {"raw_wins": 3, "raw_losses": 1, "best": 2, "best_ties": 0, "mean_rank": 1.0},
    }
    assert defaults.choose_default(tally) == "y"


def test_tiny_defaults_run_writes_a_verdict_that_rebuilds_identically(tmp_path):
    arms = defaults.build_arms(defaults.TINY)
    assert len(arms) == 8  # 2 tasks x 2 lengths x 2 learning rates
    assert {cfg.dataset for _, cfg in arms} == {"swissroll", "stdlib-text"}
    assert all([a.name for a in cfg.averages] == list(defaults.CANDIDATES) for _, cfg in arms)
    # the short and long runs of a task differ only in length
    short, long = arms[0][1], arms[2][1]
    assert replace(short, extra={}) == replace(long, extra={})
    assert short.extra["steps_per_epoch"] < long.extra["steps_per_epoch"]

    results = run_arms(arms, Options(seeds=2), progress=False)
    write_experiment(tmp_path, "defaults", results, command="test", seconds=1.0)
    report = (tmp_path / "report.md").read_text()
    assert "## Verdict" in report
    assert "](defaults.png)" in report
    assert (tmp_path / "defaults.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["analysis"]["choice"] in defaults.CANDIDATES
    assert main(["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--decay", "0.9"], ["--epochs", "3"], ["--dataset", "digits"]])
def test_defaults_refuses_options_that_would_change_its_settings(flag, tmp_path, capsys):
    assert main(["experiment", "defaults", *flag, "--out", str(tmp_path / "x")]) == 2
    assert "the defaults experiment runs fixed settings" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dataset", ["swissroll", "stdlib-text"])
def test_compare_runs_on_the_generative_tasks(dataset, tmp_path):
    arms = build_arms("compare", Options(dataset=dataset, epochs=2))
    assert [label for label, _ in arms] == ["constant LR", "cosine LR"]
    assert [cfg.lr_schedule for _, cfg in arms] == ["constant", "cosine"]
    assert all(cfg.dataset == dataset and cfg.swa_start == 0.75 for _, cfg in arms)
    tiny = defaults.TINY
    arms = [
        (
            label,
            replace(
                cfg,
                hidden=tiny.hidden[dataset],
                batch_size=tiny.batch[dataset],
                extra={"steps_per_epoch": 2, "task": tiny.task_args[dataset]},
            ),
        )
        for label, cfg in arms
    ]
    results = run_arms(arms, Options(seeds=2), progress=False)
    write_experiment(tmp_path, "compare", results, command="test", seconds=0.0)
    report = (tmp_path / "report.md").read_text()
    assert f"test {'energy distance' if dataset == 'swissroll' else 'bits per character'}" in report
    assert set(results["cosine LR"]["seeds"][0]["curves"]) == {"raw", "ema0.999", "swa"}


def test_default_spec_is_what_ema_does_without_a_decay():
    import inspect

    from polyak import EMA
    from polyak.schedules import as_schedule

    params = inspect.signature(EMA).parameters
    spec = defaults.default_spec()
    assert as_schedule(params["decay"].default) == spec.schedule()
    assert params["debias"].default == spec.debias


@pytest.mark.parametrize("name", ["swissroll", "stdlib-text"])
def test_task_experiments_compare_the_default_with_raw(name, tmp_path):
    arms = build_arms(name, Options())
    smooth, noisy = defaults.FULL.lrs[name]
    assert [(label, cfg.lr) for label, cfg in arms] == [(f"lr {smooth:g}", smooth), (f"lr {noisy:g}", noisy)]
    assert all(cfg.averages[0] == defaults.default_spec() for _, cfg in arms)
    assert [label for label, _ in build_arms(name, Options(quick=True))] == [f"lr {noisy:g}"]
    tiny = defaults.TINY
    arms = [
        (
            label,
            replace(
                cfg,
                hidden=tiny.hidden[name],
                batch_size=tiny.batch[name],
                epochs=2,
                extra={"steps_per_epoch": 2, "task": tiny.task_args[name]},
            ),
        )
        for label, cfg in arms
    ]
    results = run_arms(arms, Options(seeds=2), progress=False)
    write_experiment(tmp_path, name, results, command="test", seconds=0.0)
    report = (tmp_path / "report.md").read_text()
    assert report.count(f"| {name} lr ") == 2  # one claim row per learning rate
    assert "EMA() default vs raw" in report


def test_callbacks_without_a_decay_average_like_ema():
    import inspect

    from torch import nn

    from polyak import EMA
    from polyak.integrations._callback import build_ema
    from polyak.schedules import DEFAULT_DECAY

    for module in ("lightning", "transformers"):
        pytest.importorskip(module)
    from polyak.integrations import lightning, transformers

    for callback in (lightning.EMACallback, transformers.EMACallback):
        assert inspect.signature(callback).parameters["decay"].default is None
    assert build_ema(nn.Linear(2, 2), None, 0).schedules == (DEFAULT_DECAY,)
    assert EMA(nn.Linear(2, 2)).schedules == (DEFAULT_DECAY,)


def test_the_default_is_the_power_function_at_sigma_rel_0_05():
    from polyak.schedules import DEFAULT_DECAY

    assert isinstance(DEFAULT_DECAY, schedules.power_function)
    assert DEFAULT_DECAY.gamma == round(defaults.sigma_rel_to_gamma(0.05), 4)
    assert defaults.default_spec().schedule() == DEFAULT_DECAY
