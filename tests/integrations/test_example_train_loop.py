"""examples/train_loop.py runs end to end; its best checkpoint is the best averaged epoch and reloads."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from polyak import EMA

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_loop.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_loop_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_picks_the_best_averaged_epoch_and_the_checkpoint_reloads(tmp_path: Path) -> None:
    example = load_example()
    summary = example.main(["--epochs", "3", "--out", str(tmp_path), "--update-bn"])
    history = summary["history"]
    assert len(history) == 3
    assert all(h["val_acc_ema"] is not None for h in history)
    best = max(range(3), key=lambda i: (history[i]["val_acc_ema"], -i))
    assert summary["best_epoch"] == best
    checkpoint = torch.load(tmp_path / "best.pt", weights_only=True)
    assert checkpoint["epoch"] == best
    # the saved averaged weights give the logged averaged metric
    (_, _), (x_val, y_val) = example.make_data(0)
    model = example.make_model()
    model.load_state_dict(checkpoint["averaged_model"])
    model.eval()
    with torch.no_grad():
        acc = int((model(x_val).argmax(1) == y_val).sum()) / len(y_val)
    assert acc == history[best]["val_acc_ema"]
    # and the EMA state resumes into a fresh EMA
    ema = EMA(example.make_model())
    ema.load_state_dict(checkpoint["ema"])
    assert ema.step == checkpoint["ema"]["step"] > 0


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s alone, much more on a loaded machine
def test_example_ablation_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--no-ema", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "val_acc_ema -" in result.stdout
    assert (tmp_path / "best.pt").exists()
    assert torch.load(tmp_path / "best.pt", weights_only=True)["ema"] is None
