"""What a damaged, edited or crafted file does: always a ValueError naming the file (and, from the CLI,
exit code 2 with one line), never a silent load, a raw exception or an unbounded allocation."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import polyak
from polyak.cli import main

from .conftest import make_model


def _saved(tmp_path: Path, suffix: str = ".safetensors") -> Path:
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.001)
    ema = polyak.EMA(model, decay=0.9)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    ema.update()
    return polyak.save(tmp_path / f"c{suffix}", ema, model=model, optimizer=opt)


def _header(blob: bytes) -> tuple[int, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return n, blob[8 : 8 + n]


def _with_header(blob: bytes, header: bytes) -> bytes:
    n, _ = _header(blob)
    assert len(header) == n, "edits must keep the header's length"
    return blob[:8] + header + blob[8 + n :]


# --- 3. the checksum covers the header and the layout ----------------------------------------------------
def _edit_lr(header: bytes) -> bytes:
    assert header.count(b"0.001") == 1
    return header.replace(b"0.001", b"0.002")


def _edit_step(header: bytes) -> bytes:
    # the EMA step inside the JSON tree: ["step", 1]
    marker = b'[\\"step\\", 1]'
    assert header.count(marker) == 1
    return header.replace(marker, b'[\\"step\\", 7]')


def _edit_dtype(header: bytes) -> bytes:
    parsed = json.loads(header)
    name = next(k for k, v in parsed.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = header.index(json.dumps(name).encode())
    at = header.index(b'"F32"', start)
    return header[:at] + b'"I32"' + header[at + 5 :]


def _swap_offsets(header: bytes) -> bytes:
    parsed = json.loads(header)
    by_shape: dict[str, list[str]] = {}
    for k, v in parsed.items():
        if k != "__metadata__":
            by_shape.setdefault(json.dumps([v["dtype"], v["shape"]]), []).append(k)

    def offsets(name: str) -> bytes:
        return json.dumps(parsed[name]["data_offsets"], separators=(",", ":")).encode()

    oa, ob = next(
        (offsets(a), offsets(b))
        for names in by_shape.values()
        for a in names
        for b in names
        if a < b and len(offsets(a)) == len(offsets(b))
    )
    assert header.count(oa) == 1
    assert header.count(ob) == 1
    return header.replace(oa, b"\0").replace(ob, oa).replace(b"\0", ob)


@pytest.mark.parametrize("edit", [_edit_lr, _edit_step, _edit_dtype, _swap_offsets], ids=lambda f: f.__name__)
def test_same_length_header_edits_fail_the_checksum(tmp_path: Path, edit: Any) -> None:
    path = _saved(tmp_path)
    blob = path.read_bytes()
    _, header = _header(blob)
    path.write_bytes(_with_header(blob, edit(header)))
    with pytest.raises(ValueError, match="sha256 of its header and tensor data does not match"):
        polyak.io.read(path)


def test_removing_the_checksum_of_a_new_file_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    blob = path.read_bytes()
    _, header = _header(blob)
    path.write_bytes(_with_header(blob, header.replace(b'"checksum":', b'"checksuX":')))
    with pytest.raises(ValueError, match="must carry a checksum"):
        polyak.io.read(path)


# --- 2. one handle: an atomic replace mid-read cannot mix two versions -----------------------------------
def test_a_replace_during_the_read_cannot_mix_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every time the checkpoint is opened, the trainer replaces it with the next version right after.
    Whatever the reader does, the metadata and the tensors it returns must come from one version."""
    versions = []
    for v in range(8):
        source = polyak.save(tmp_path / f"v{v}.safetensors", extra={"version": v, "tag": torch.full((64,), v)})
        versions.append(source.read_bytes())
    path = tmp_path / "live.safetensors"
    path.write_bytes(versions[0])
    state = {"next": 1}

    def trainer_saves() -> None:
        tmp = tmp_path / ".live.tmp"
        tmp.write_bytes(versions[state["next"] % len(versions)])
        os.replace(tmp, path)
        state["next"] += 1

    real_open = builtins.open

    def open_then_replace(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        if str(file) == str(path):
            trainer_saves()
        return handle

    import safetensors.torch

    real_load_file = safetensors.torch.load_file

    def load_file_then_replace(file: Any, *args: Any, **kwargs: Any) -> Any:
        trainer_saves()  # lands between polyak's checks and safetensors' own open
        return real_load_file(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_then_replace)
    monkeypatch.setattr(safetensors.torch, "load_file", load_file_then_replace)
    for _ in range(3):
        extra = polyak.io.read(path).extra
        assert torch.equal(extra["tag"], torch.full((64,), extra["version"]))


# --- 4. .pt files: CRC-checked, bounded, every failure a ValueError ---------------------------------------
def _record_data_offset(blob: bytes, name_suffix: str) -> tuple[int, int]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_suffix))
    fixed = blob[info.header_offset : info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", fixed[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_pt_flipped_byte_in_a_tensor_record_fails_its_crc(tmp_path: Path) -> None:
    path = _saved(tmp_path, ".pt")
    blob = bytearray(path.read_bytes())
    start, size = _record_data_offset(bytes(blob), "/data/0")
    blob[start + size // 2] ^= 0x04
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="CRC-32"):
        polyak.io.read(path)


def test_pt_truncated_anywhere_is_a_value_error(tmp_path: Path) -> None:
    blob = _saved(tmp_path, ".pt").read_bytes()
    cut = tmp_path / "cut.pt"
    for n in sorted({4, 30, 100, *range(200, len(blob) - 1, max(1, len(blob) // 19)), len(blob) - 1}):
        cut.write_bytes(blob[:n])
        with pytest.raises(ValueError, match="cut.pt"):
            polyak.io.read(cut)


def test_pt_compressed_record_is_not_inflated(tmp_path: Path) -> None:
    """A record that inflates far beyond the file (a zip bomb) is refused before anything is inflated."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(64 << 20))  # 64 MiB of zeros, ~64 KiB on disk
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match="refusing to inflate"):
        polyak.io.read(path)


# --- 7. crafted headers and trees -------------------------------------------------------------------------
def _craft_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _polyak_meta(tree: str) -> dict[str, str]:
    return {"format": "polyak.checkpoint", "version": "1", "tree": tree}


CRAFTED: dict[str, tuple[bytes, bytes, str]] = {
    "deep-header": (b"[" * 100_000 + b"]" * 100_000, b"", "nests too deeply"),
    "deep-tree": (
        json.dumps({"__metadata__": _polyak_meta("[" * 100_000 + "]" * 100_000)}).encode(),
        b"",
        "nests too deeply",
    ),
    "deep-dict-tree": (
        json.dumps({"__metadata__": _polyak_meta('{"__tuple__": [' * 5_000 + "1" + "]}" * 5_000)}).encode(),
        b"",
        "nests too deeply",
    ),
    "infinite-offset": (
        b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}',
        b"\0" * 4,
        "malformed offsets",
    ),
    "float-shape": (b'{"x": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}', b"\0" * 4, "malformed shape"),
    "unknown-dtype": (b'{"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "unknown dtype"),
    "overlap": (
        b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        "does not start where the previous ends",
    ),
    "dtype-node-int": (
        json.dumps({"__metadata__": _polyak_meta('{"__dtype__": 5}')}).encode(),
        b"",
        "not a torch dtype",
    ),
    "dtype-node-name": (
        json.dumps({"__metadata__": _polyak_meta('{"__dtype__": "nn"}')}).encode(),
        b"",
        "not a torch dtype",
    ),
    "dict-node": (json.dumps({"__metadata__": _polyak_meta('{"__dict__": 3}')}).encode(), b"", "dict node"),
    "tensor-node": (json.dumps({"__metadata__": _polyak_meta('{"__tensor__": [1]}')}).encode(), b"", "missing"),
    "metadata-not-strings": (b'{"__metadata__": {"format": 1}}', b"", "map strings to strings"),
    "tree-not-sections": (json.dumps({"__metadata__": _polyak_meta("[1, 2]")}).encode(), b"", "not a mapping"),
    "bad-version": (
        json.dumps({"__metadata__": {"format": "polyak.checkpoint", "version": "1e9", "tree": "{}"}}).encode(),
        b"",
        "unreadable checkpoint version",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_safetensors_is_a_named_value_error(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    header, data, message = CRAFTED[case]
    path = _craft_safetensors(tmp_path / "crafted.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as info:
        polyak.io.read(path)
    assert "crafted.safetensors" in str(info.value)
    for command in (["inspect", str(path)], ["extract", str(path), "-o", str(tmp_path / "o.safetensors")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[0].startswith(f"polyak {command[0]}: error:")


def test_damaged_files_never_escape_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random byte flips and cuts of both formats: ``polyak inspect`` answers 0 or 2, and on 2 one line."""
    rng = random.Random(13)
    for suffix in (".safetensors", ".pt"):
        blob = _saved(tmp_path, suffix).read_bytes()
        bad = tmp_path / f"bad{suffix}"
        for trial in range(40):
            data = bytearray(blob)
            if trial % 4 == 0:
                data = data[: rng.randrange(1, len(data))]
            else:
                for _ in range(rng.randint(1, 3)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            bad.write_bytes(bytes(data))
            code = main(["inspect", str(bad)])
            out = capsys.readouterr()
            assert code in (0, 2), (suffix, trial)
            if code == 2:
                assert len(out.err.strip().splitlines()) == 1, (suffix, trial, out.err)
