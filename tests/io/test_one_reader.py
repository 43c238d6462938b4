"""One reader of the state format serves the live EMA and the files: ``polyak extract`` gives what
``ema.averaged_state_dict()`` gives, and checkpoints written by earlier versions still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import polyak
from polyak.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _assert_equal_states(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("updates", [0, 3])
def test_extract_of_debiased_ema_equals_averaged_state_dict(tmp_path: Path, suffix: str, updates: int) -> None:
    """Before its first update a debias=True EMA's average is the live weights, not the zero shadow."""
    model = _model()
    ema = polyak.EMA(model, decay=0.9, debias=True)
    for _ in range(updates):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    ckpt = polyak.save(tmp_path / f"c{suffix}", ema, model=model)
    out = tmp_path / "avg.safetensors"
    assert main(["extract", str(ckpt), "-o", str(out)]) == 0
    _assert_equal_states(load_file(out), ema.averaged_state_dict())


def test_extract_of_debiased_ema_without_model_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ema = polyak.EMA(_model(), decay=0.9, debias=True)
    ckpt = polyak.save(tmp_path / "c.safetensors", ema)
    assert main(["extract", str(ckpt), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "has not been updated yet" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("debias", [0, 1])
def test_legacy_checkpoints_still_load(suffix: str, debias: int, tmp_path: Path) -> None:
    """Files written by polyak's first checkpoint version (checksum over the tensor data only)."""
    name = f"legacy_v1_debias{debias}"
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = polyak.EMA(model, decay=[0.9, polyak.schedules.uniform()], debias=bool(debias), start_step=1)
    ckpt = polyak.load(FIXTURES / f"{name}{suffix}", ema, model=model, optimizer=opt)
    assert ckpt.extra == {"epoch": 3}
    assert ema.step == 5
    assert len(opt.state_dict()["state"]) == 6  # a momentum buffer per parameter
    for k in range(2):
        expected = load_file(FIXTURES / f"{name}.expected{k}.safetensors")
        _assert_equal_states(ema.averaged_state_dict(k), expected)
        out = tmp_path / f"x{k}.safetensors"
        assert main(["extract", str(FIXTURES / f"{name}{suffix}"), "--index", str(k), "-o", str(out)]) == 0
        _assert_equal_states(load_file(out), expected)


def test_legacy_checksum_still_catches_a_flipped_byte(tmp_path: Path) -> None:
    blob = bytearray((FIXTURES / "legacy_v1_debias0.safetensors").read_bytes())
    blob[-3] ^= 0x10
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        polyak.io.read(path)
