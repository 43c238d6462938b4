"""polyak.save streams a safetensors file: standard bytes, aligned tensors, and no second copy in memory."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import polyak

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(ALL_DTYPES):
        base = torch.randn(3, 5, generator=gen) * 50
        out[f"t{i}"] = base.to(dtype) if dtype != torch.complex64 else torch.complex(base, -base)
    out["empty"] = torch.zeros(0, 4)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    out["grad"] = torch.randn(4, generator=gen).requires_grad_()
    return out


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def test_every_dtype_round_trips_through_safetensors_own_reader(tmp_path: Path) -> None:
    tensors = _tensors()
    path = polyak.save(tmp_path / "c.safetensors", extra=tensors)
    loaded = load_file(str(path))
    checkpoint = polyak.io.read(path)  # verifies payload size and sha256
    for name, tensor in tensors.items():
        (stored,) = [v for k, v in loaded.items() if k.endswith(f".{name}")]
        assert stored.dtype == tensor.dtype, name
        assert stored.shape == tensor.shape, name
        assert torch.equal(_bytes(stored), _bytes(tensor)), name
        assert torch.equal(_bytes(checkpoint.extra[name]), _bytes(stored)), name


def test_tensors_are_aligned_and_contiguous_in_the_file(tmp_path: Path) -> None:
    path = polyak.save(tmp_path / "c.safetensors", extra=_tensors())
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    meta = header.pop("__metadata__")
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gaps, no overlaps
    assert spans[-1][1] == len(raw) - 8 - header_len == int(meta["payload_bytes"])
    with safe_open(str(path), framework="pt") as handle:
        for name, entry in header.items():
            size = handle.get_tensor(name).element_size()
            assert (8 + header_len + entry["data_offsets"][0]) % size == 0, name


def test_a_dtype_safetensors_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"cannot store tensor 'extra.q' of dtype torch.complex128"):
        polyak.save(tmp_path / "c.safetensors", extra={"q": torch.zeros(2, dtype=torch.complex128)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_holds_one_tensor_at_a_time_not_the_whole_file(tmp_path: Path, suffix: str) -> None:
    """Peak memory while saving 256 MiB of weights grows by far less than the file (the old writer built
    the whole file in memory first: +256 MiB)."""
    script = textwrap.dedent(
        """
        import resource, sys, torch, polyak
        state = {f"w{i}": torch.ones(8 << 20) for i in range(8)}  # 8 x 32 MiB
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        polyak.save(sys.argv[1], model=state)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)  # MiB (ru_maxrss is in KiB on Linux)
        """
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss units differ outside Linux")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / f"big{suffix}")], capture_output=True, text=True, check=True
    )
    grew_mib = int(out.stdout.strip())
    assert grew_mib < 96, f"peak memory grew by {grew_mib} MiB while saving 256 MiB"
    assert polyak.io.read(tmp_path / f"big{suffix}").model["w7"].sum() == 8 << 20
