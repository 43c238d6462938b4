"""``polyak inspect --json``: the text form's facts as one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import polyak
from polyak.cli import main
from polyak.io import export

from .conftest import make_model


def test_inspect_json_polyak_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(0)
    ema = polyak.EMA(model, decay=[0.8, 0.95])
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ema.update()
    path = polyak.save(tmp_path / "run.safetensors", ema, model=model)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "polyak"
    assert info["step"] == 3
    assert info["averages"] == 2
    assert len(info["decay"]) == 2
    assert info["sections"] == ["ema", "model"]
    assert info["checksum"] == polyak.io.read(path).metadata["checksum"]
    assert info["checksum"].startswith("sha256:")
    names = {t["name"]: t for t in info["tensors"]}
    assert names["ema.averages.0.0.weight"] == {"name": "ema.averages.0.0.weight", "dtype": "float32", "shape": [8, 4]}
    assert info["bytes"] == sum(
        4 * torch.Size(t["shape"]).numel() for t in info["tensors"] if t["dtype"] == "float32"
    ) + sum(8 * torch.Size(t["shape"]).numel() for t in info["tensors"] if t["dtype"] == "int64")
    averaged, raw = ema.averaged_state_dict(0), model.state_dict()
    keys = [k for k, v in raw.items() if v.is_floating_point()]
    num = sum(float((averaged[k].double() - raw[k].double()).norm()) ** 2 for k in keys)
    den = sum(float(raw[k].double().norm()) ** 2 for k in keys)
    assert info["raw_vs_ema"]["relative_l2"] == pytest.approx((num / den) ** 0.5, rel=1e-12)
    assert info["raw_vs_ema"]["float_tensors"] == len(keys)


def test_inspect_json_peer_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(1)
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    path = export(tmp_path / "ema.pt", ema, format="ema_pytorch")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "ema_pytorch"
    assert info["step"] == 1
    assert info["checksum"] is None
    assert info["tensors"]
