"""``polyak convert`` / ``polyak extract`` outputs: every target writable in both file formats that can
hold it, and never over the input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polyak
from polyak.cli import main

from .conftest import make_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, polyak.EMA]:
    model = make_model(0)
    ema = polyak.EMA(model, decay=0.8)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    return polyak.save(tmp_path / "ckpt.safetensors", ema, model=model), ema


def test_convert_to_timm_safetensors_writes_the_averaged_state_dict(tmp_path: Path, checkpoint) -> None:
    """timm reads a .safetensors checkpoint as the state dict itself (timm.models.load_state_dict)."""
    path, ema = checkpoint
    out = tmp_path / "timm.safetensors"
    assert main(["convert", str(path), "--to", "timm", "-o", str(out)]) == 0
    written = load_file(out)
    expected = ema.averaged_state_dict()
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key


@pytest.mark.parametrize(
    ("target", "prefix"), [("ema_pytorch", "ema_model."), ("averaged_model", "module."), ("state_dict", "")]
)
def test_convert_to_flat_peer_formats_in_safetensors(tmp_path: Path, checkpoint, target: str, prefix: str) -> None:
    path, ema = checkpoint
    out = tmp_path / f"{target}.safetensors"
    assert main(["convert", str(path), "--to", target, "-o", str(out)]) == 0
    written = load_file(out)
    for key, value in ema.averaged_state_dict().items():
        assert torch.equal(written[prefix + key], value), key


@pytest.mark.parametrize("command", ["extract", "convert"])
def test_output_onto_the_input_is_refused(
    tmp_path: Path, checkpoint, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = checkpoint
    before = path.read_bytes()
    extra = ["--to", "state_dict"] if command == "convert" else []
    alias = tmp_path / "." / path.name  # another spelling of the same file
    assert main([command, str(path), *extra, "-o", str(alias)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "is the input checkpoint" in err[0]
    assert path.read_bytes() == before
    polyak.io.read(path)
