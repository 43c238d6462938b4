"""Tiny end-to-end runs of every experiment (few samples, 2 seeds, 2 epochs) and the CLI's errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyak.cli import main
from polyak.experiments.report import write_experiment
from polyak.experiments.runner import AverageSpec, RunConfig, train_seed
from polyak.experiments.suite import EXPERIMENTS, Options, build_arms, run_arms
from polyak.experiments.tasks import TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = Options(seeds=2, epochs=2, num_samples=80, hidden=(8,))


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in ("defaults", *TASKS)])  # those: test_defaults.py
def test_each_experiment_writes_all_files(name, tmp_path):
    results = run_arms(build_arms(name, TINY), TINY, progress=False)
    write_experiment(tmp_path, name, results, command=f"test {name}", seconds=0.0)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"# polyak experiment: {name}")
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs, "no plot written"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({png.name})" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["experiment"] == name
    assert data["versions"]["torch"] == torch.__version__
    for label, arm in data["arms"].items():
        assert arm["config"]["epochs"] == 2
        assert [s["seed"] for s in arm["seeds"]] == [0, 1], label
        for seed in arm["seeds"]:
            assert "raw" in seed["curves"]
            for curve in seed["curves"].values():
                assert all(len(curve[k]) == 2 for k in ("val", "test", "val_loss", "test_loss"))
    assert set(data["analysis"]) == set(data["arms"])


def test_batchnorm_arm_evaluates_stale_and_recomputed_statistics():
    cfg = RunConfig(
        "digits", (8,), (AverageSpec("ema0.9", decay=0.9),), 2, batchnorm=True, bn_variants=True, num_samples=80
    )
    assert cfg.model_names() == ["raw", "ema0.9", "ema0.9_stale", "ema0.9_recomputed"]
    curves = train_seed(cfg, 0)["curves"]
    assert set(curves) == set(cfg.model_names())


def test_same_seed_same_numbers():
    cfg = RunConfig("regression", (8,), (AverageSpec("ema0.9", decay=0.9),), 2, swa_start=0.5, num_samples=80)
    a, b = train_seed(cfg, 3), train_seed(cfg, 3)
    assert a["curves"] == b["curves"]
    assert train_seed(cfg, 4)["curves"] != a["curves"]


def test_cli_experiment_and_demo(tmp_path, capsys):
    out = tmp_path / "reg"
    args = ["experiment", "regression", "--seeds", "2", "--epochs", "2", "--samples", "60"]
    assert main([*args, "--decay", "0.9", "--out", str(out), "--quiet"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {
        "report.md",
        "results.json",
        "curves_mlp_lr_0.001.png",
        "per_seed_mlp_lr_0.01.png",
    }
    demo = tmp_path / "demo"
    assert main(["demo", "--seeds", "2", "--epochs", "2", "--samples", "60", "--out", str(demo), "--quiet"]) == 0
    assert f"report: {demo / 'report.md'}" in capsys.readouterr().out
    index = (demo / "report.md").read_text()
    assert "(regression/report.md)" in index
    assert "(digits/report.md)" in index
    assert "(swissroll/report.md)" in index
    assert "averaged weights sample better" in index
    assert (demo / "digits" / "results.json").is_file()
    # the report rebuilds from results.json alone, identically
    rebuilt = tmp_path / "rebuilt"
    assert main(["report", str(demo / "digits" / "results.json"), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "report.md").read_text() == (demo / "digits" / "report.md").read_text()
    assert main(["report", str(demo / "report.md")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiment", "nope"], "unknown experiment 'nope'"),
        (["experiment", "regression", "--seeds", "0"], "--seeds must be >= 1"),
        (["experiment", "regression", "--decay", "1.0"], "--decay must be in [0, 1)"),
        (["experiment", "regression", "--decay", "-0.1"], "--decay must be in [0, 1)"),
        (["experiment", "sweep", "--dataset", "cifar"], "unknown data set 'cifar'"),
        (["demo", "--seeds", "-1"], "--seeds must be >= 1"),
        (["experiment", "compare", "--lr", "0"], "--lr must be a positive number"),
        (["experiment", "digits", "--epochs", "1"], "--epochs must be >= 2"),
        (["experiment", "digits", "--samples", "10"], "--samples must be >= 40"),
        (["experiment", "regression", "--decay", "0.9", "0.9"], "lists a value twice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["experiment", "regression", "--out", str(target)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from polyak.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['experiment', '--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('scipy', 'sklearn', 'matplotlib', 'rich', 'mnist1d') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_report_path_is_printed_for_make_demo():
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert "polyak demo --out reports/demo" in makefile


def test_example_measure_averaging_runs():
    import importlib.util

    path = Path(__file__).parents[2] / "examples" / "measure_averaging.py"
    spec = importlib.util.spec_from_file_location("measure_averaging", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw, averaged = module.run(seed=0, epochs=2)
    assert raw > 0
    assert len(averaged) == len(module.DECAYS)
