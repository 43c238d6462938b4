"""``polyak smooth`` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from polyak.cli import main


@pytest.fixture
def log_csv(tmp_path):
    path = tmp_path / "log.csv"
    rng = np.random.default_rng(0)
    loss = np.exp(-np.arange(50) / 20) + 0.05 * rng.normal(size=50)
    pd.DataFrame({"step": np.arange(50), "loss": loss}).to_csv(path, index=False)
    return path, loss


def test_smooth_csv_writes_the_pandas_ema(log_csv, tmp_path):
    path, loss = log_csv
    out = tmp_path / "smoothed.csv"
    plot = tmp_path / "plot.png"
    assert main(["smooth", str(path), "--column", "loss", "--span", "10", "--out", str(out), "--plot", str(plot)]) == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    ours = np.array([float(r["loss_smoothed"]) for r in rows])
    np.testing.assert_allclose(ours, pd.Series(loss).ewm(span=10).mean(), rtol=1e-12)
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("method", ["sma", "wma", "kalman"])
def test_smooth_methods_and_jsonl(tmp_path, method, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps({"step": i, "acc": i / 10}) for i in range(30)) + "\n")
    assert main(["smooth", str(path), "--column", "acc", "--method", method, "--window", "5"]) == 0
    assert "acc_smoothed: 30 rows" in capsys.readouterr().out


def test_smooth_errors(log_csv, tmp_path, capsys):
    path, _ = log_csv
    assert main(["smooth", str(path), "--column", "acc"]) == 2
    assert "available: step, loss" in capsys.readouterr().err
    assert main(["smooth", str(tmp_path / "nope.csv"), "--column", "loss"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["smooth", str(path), "--column", "loss", "--alpha", "2"]) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err
