"""``polyak inspect | extract | convert`` on real files; errors exit 2 with one line on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polyak
from polyak.cli import main
from polyak.io import from_peer

from .conftest import make_model


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, polyak.EMA]:
    model = make_model(0)
    ema = polyak.EMA(model, decay=[0.8, 0.95])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    return polyak.save(tmp_path / "run.safetensors", ema, model=model, optimizer=opt), ema


def test_inspect_reports_contents_and_raw_vs_ema(trained, capsys: pytest.CaptureFixture[str]) -> None:
    path, ema = trained
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:  polyak" in out
    assert "step:    4" in out
    assert "constant(decay=0.8)" in out
    assert "averages: 2" in out
    assert "sections: ema, model, optimizer" in out
    assert "ema.averages.0.0.weight" in out
    assert "float32   [8, 4]" in out
    # the relative distance printed is the one we compute here
    averaged, raw = ema.averaged_state_dict(0), ema.model.state_dict()
    keys = [k for k, v in raw.items() if v.is_floating_point()]
    num = sum(float((averaged[k].double() - raw[k].double()).norm()) ** 2 for k in keys)
    den = sum(float(raw[k].double().norm()) ** 2 for k in keys)
    assert f"relative L2 distance {(num / den) ** 0.5:.3e}" in out
    differing = sum(not torch.equal(averaged[k], raw[k]) for k in keys)
    assert 0 < differing <= len(keys)
    assert f"{differing}/{len(keys)} float tensors differ" in out


def test_extract_gives_a_loadable_model_file(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, ema = trained
    out = tmp_path / "model.safetensors"
    assert main(["extract", str(path), "-o", str(out), "--index", "1"]) == 0
    weights = load_file(str(out))
    model = make_model(3)
    model.load_state_dict(weights)  # strict: every key, int buffers included
    for key, value in ema.averaged_state_dict(1).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_convert_to_timm_and_back(trained, tmp_path: Path) -> None:
    path, ema = trained
    timm_file = tmp_path / "timm.pth"
    assert main(["convert", str(path), "--to", "timm", "-o", str(timm_file)]) == 0
    imported = from_peer(timm_file, make_model(5), decay=0.8)
    for key, value in ema.averaged_state_dict(0).items():
        if not value.is_floating_point():
            continue  # integer buffers are never averaged: polyak takes them from the live model
        assert torch.equal(imported.averaged_state_dict()[key], value), key

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(timm_file), "--to", "polyak", "-o", str(back)]) == 0
    model = make_model(6)
    again = polyak.EMA(model, decay=0.8)
    polyak.load(back, again, model=model)
    for key, value in ema.averaged_state_dict(0).items():
        assert torch.equal(again.averaged_state_dict()[key], value), key


@pytest.mark.parametrize("command", ["inspect", "extract", "convert"])
def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    argv = [command, str(bad)]
    if command != "inspect":
        argv += ["-o", str(tmp_path / "out.safetensors")]
    if command == "convert":
        argv += ["--to", "timm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "truncated" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_list_format_without_model_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(0)
    torch.save(
        {"decay": 0.9, "num_updates": 3, "shadow_params": [p.detach() for p in model.parameters()]}, tmp_path / "te.pt"
    )
    assert main(["extract", str(tmp_path / "te.pt"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "parameter order" in capsys.readouterr().err


def test_inspect_peer_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(0)
    ema = polyak.EMA(model, decay=0.8)
    polyak.io.export(tmp_path / "timm.pth", ema, format="timm")
    assert main(["inspect", str(tmp_path / "timm.pth")]) == 0
    out = capsys.readouterr().out
    assert "format:  timm" in out
    assert "state_dict_ema.0.weight" in out
    assert "raw vs EMA: 0/8 float tensors differ" in out  # nothing trained yet: average == weights
    polyak.io.export(tmp_path / "te.pt", ema, format="torch_ema")
    assert main(["inspect", str(tmp_path / "te.pt")]) == 0
    out = capsys.readouterr().out
    assert "format:  torch_ema" in out
    assert "step:" not in out  # a constant decay: torch_ema counts no updates (num_updates=None)
    assert "decay:   0.8" in out
    polyak.io.export(tmp_path / "u.pt", ema, format="ultralytics")
    assert main(["inspect", str(tmp_path / "u.pt")]) == 2
    assert "trust_pickle=True" in capsys.readouterr().err
    assert main(["inspect", "--trust-pickle", str(tmp_path / "u.pt")]) == 0
    assert "format:  ultralytics" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_extract_gives_every_name_of_a_tied_tensor_its_average(tmp_path: Path, suffix: str) -> None:
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    ema = polyak.EMA(model, decay=0.5)
    with torch.no_grad():
        emb.weight.add_(2.0)
    ema.update()
    path = polyak.save(tmp_path / f"c{suffix}", ema, model=model)
    out = tmp_path / "model.safetensors"
    assert main(["extract", str(path), "-o", str(out)]) == 0
    weights = load_file(str(out))
    expected = ema.averaged_state_dict()["emb.weight"]
    assert torch.equal(weights["emb.weight"], expected)
    assert torch.equal(weights["head.weight"], expected)  # not the live weight under the second name
