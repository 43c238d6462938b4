"""polyak.save / polyak.load: round trips, exact resume, and bad input.

Bad inputs tried (each must raise a clear error naming the problem and change nothing on disk or in
the live objects):

 1. safetensors file truncated inside its header
 2. safetensors file truncated inside its tensor data
 3. ``.pt`` file truncated
 4. one flipped byte in the tensor data (checksum)
 5. a file that is not a checkpoint (text)
 6. a torch file holding an unrecognised dict
 7. a checkpoint written by a newer polyak (version 99)
 8. wrong architecture for the EMA (missing and unexpected keys listed)
 9. wrong architecture for the raw model (missing and unexpected keys listed)
10. shape mismatch
11. dtype mismatch (EMA shadows and model weights)
12. NaN in an EMA average
13. inf in the raw model weights
14. a pickle that tries to execute code (weights_only refuses; no marker file appears)
15. a missing file
16. a directory given as the path (save and load)
17. a directory that is not writable
18. disk full mid-write (ENOSPC): the old file is intact and no temporary file is left
19. a section asked for but not saved (optimizer=)
20. an unsupported object in ``extra`` for safetensors
21. an optimizer built over other parameters (checked before the EMA and model are touched)
22. a writer process killed with SIGKILL while its temporary file is being written
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import polyak
from polyak.io import _atomic

from .conftest import make_model


def _train(model: nn.Module, opt: torch.optim.Optimizer, ema: polyak.EMA, steps: int, start: int) -> None:
    data = torch.Generator().manual_seed(1234)
    xs = torch.randn(64, 16, 4, generator=data)
    ys = torch.randn(64, 16, 2, generator=data)
    model.train()
    for step in range(start, start + steps):
        loss = nn.functional.mse_loss(model(xs[step]), ys[step])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, polyak.EMA]:
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ema = polyak.EMA(model, decay=[polyak.schedules.ultralytics(0.999, tau=5), 0.9], update_every=2)
    return model, opt, ema


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_exact_resume_is_bitwise(tmp_path: Path, suffix: str) -> None:
    """N steps, save, resume in fresh objects, M steps == N+M steps uninterrupted (model, optimizer, EMA)."""
    n, m = 7, 6
    torch.manual_seed(99)
    ref_model, ref_opt, ref_ema = _setup(0)
    _train(ref_model, ref_opt, ref_ema, n + m, 0)

    torch.manual_seed(99)
    model, opt, ema = _setup(0)
    _train(model, opt, ema, n, 0)
    path = tmp_path / f"ckpt{suffix}"
    polyak.save(path, ema, model=model, optimizer=opt, extra={"step": n, "rng": torch.get_rng_state()})
    torch.manual_seed(12345)  # the resumed process starts from different random state and weights

    model2, opt2, ema2 = _setup(1)
    ckpt = polyak.load(path, ema2, model=model2, optimizer=opt2)
    torch.set_rng_state(ckpt.extra["rng"])
    _train(model2, opt2, ema2, m, ckpt.extra["step"])

    for (k1, v1), (k2, v2) in zip(ref_model.state_dict().items(), model2.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2), k1
    for index in range(2):
        resumed = ema2.averaged_state_dict(index)
        for key, value in ref_ema.averaged_state_dict(index).items():
            assert torch.equal(value, resumed[key]), (index, key)
    assert ema2.step == ref_ema.step == n + m
    assert ema2.last_decays == ref_ema.last_decays
    s1, s2 = ref_opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for p in s1["state"]:
        for key in s1["state"][p]:
            assert torch.equal(s1["state"][p][key], s2["state"][p][key])


def test_safetensors_file_is_plain_safetensors_with_metadata(tmp_path: Path, model: nn.Module) -> None:
    from safetensors import safe_open

    ema = polyak.EMA(model, decay=0.99)
    ema.update()
    path = polyak.save(tmp_path / "e.safetensors", ema)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "polyak.checkpoint"
    assert meta["ema_step"] == "1"
    assert "constant(decay=0.99)" in meta["ema_config"]
    assert "ema.averages.0.0.weight" in names


def test_unknown_ema_fields_round_trip(tmp_path: Path, model: nn.Module) -> None:
    """Fields another polyak version adds to state_dict() survive a safetensors round trip."""
    ema = polyak.EMA(model, decay=0.9)
    state = ema.state_dict()
    state["future_field"] = {"a": [1, 2.5, None, True], 3: (1, "x")}
    state["future_tensor"] = torch.arange(3)
    polyak.save(tmp_path / "f.safetensors", state)
    back = polyak.io.read(tmp_path / "f.safetensors").ema
    assert back is not None
    assert back["future_field"] == {"a": [1, 2.5, None, True], 3: (1, "x")}
    assert torch.equal(back["future_tensor"], torch.arange(3))
    assert back["products"] == state["products"]


def test_tied_and_non_contiguous_tensors_save(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied
    ema = polyak.EMA(model, decay=0.9)
    polyak.save(tmp_path / "t.safetensors", ema, model=model, extra={"view": torch.randn(4, 4).t()})
    model2 = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model2[1].weight = model2[0].weight
    ckpt = polyak.load(tmp_path / "t.safetensors", polyak.EMA(model2, decay=0.9), model=model2)
    assert torch.equal(model2[0].weight, model[0].weight)
    assert ckpt.extra["view"].shape == (4, 4)


# --- bad input -----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path, model: nn.Module) -> tuple[Path, polyak.EMA]:
    ema = polyak.EMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    ema.update()
    return polyak.save(tmp_path / "good.safetensors", ema, model=model), ema


def _fresh() -> tuple[nn.Module, polyak.EMA, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model(5)
    ema = polyak.EMA(model, decay=0.9)
    return model, ema, _snapshot(model.state_dict()), _snapshot(ema.averaged_state_dict())


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _assert_untouched(model: nn.Module, ema: polyak.EMA, before_model: dict, before_ema: dict) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(v, before_ema[k]), k
    assert ema.step == 0


@pytest.mark.parametrize(
    ("cut", "message"), [(lambda n: 20, "truncated"), (lambda n: n - 7, "truncated")], ids=["header", "data"]
)
def test_truncated_safetensors_is_named(tmp_path: Path, saved, cut, message: str) -> None:
    path, _ = saved
    blob = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(blob[: cut(len(blob))])
    model, ema, bm, be = _fresh()
    with pytest.raises(ValueError, match=message):
        polyak.load(bad, ema, model=model)
    _assert_untouched(model, ema, bm, be)


def test_truncated_pt_is_named(tmp_path: Path, model: nn.Module) -> None:
    path = polyak.save(tmp_path / "c.pt", polyak.EMA(model, decay=0.9))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        polyak.io.read(path)


def test_flipped_byte_fails_checksum(tmp_path: Path, saved) -> None:
    path, _ = saved
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        polyak.io.read(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, these are not weights\n" * 10)
    with pytest.raises(ValueError, match="not a safetensors or torch checkpoint"):
        polyak.io.read(path)


def test_unrecognised_torch_dict(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"hello": 1, "weights": [torch.ones(2)]}, path)
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        polyak.load(path, polyak.EMA(model, decay=0.9))


def test_newer_version_refused(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "new.pt"
    torch.save({"format": "polyak.checkpoint", "version": 99, "ema": None}, path)
    with pytest.raises(ValueError, match="newer polyak"):
        polyak.io.read(path)


def test_wrong_architecture_lists_keys(saved) -> None:
    path, _ = saved
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    ema = polyak.EMA(other, decay=0.9)
    before = _snapshot(ema.averaged_state_dict())
    with pytest.raises(ValueError, match=r"missing keys \[.*'3.weight'.*unexpected keys \[.*'1.running_mean'"):
        polyak.load(path, ema)
    with pytest.raises(ValueError, match=r"missing keys \[.*'3.bias'.*unexpected keys \[.*'1.num_batches_tracked'"):
        polyak.load(path, model=other)
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(v, before[k])


def test_shape_mismatch(saved) -> None:
    path, _ = saved
    model = make_model(3, width=6)
    ema = polyak.EMA(model, decay=0.9)
    with pytest.raises(ValueError, match="shape mismatch"):
        polyak.load(path, ema)
    with pytest.raises(ValueError, match="shape mismatch"):
        polyak.load(path, model=model)


def test_dtype_mismatch(saved) -> None:
    path, _ = saved
    model = make_model(3).double()
    with pytest.raises(ValueError, match="dtype mismatch"):
        polyak.load(path, polyak.EMA(model, decay=0.9))
    before = _snapshot(model.state_dict())
    with pytest.raises(ValueError, match="dtype mismatch"):
        polyak.load(path, model=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nan_in_average_refused(tmp_path: Path, model: nn.Module) -> None:
    ema = polyak.EMA(model, decay=0.9)
    state = ema.state_dict()
    state["averages"][0]["0.weight"][0, 0] = float("nan")
    path = polyak.save(tmp_path / "nan.safetensors", state, model=model)
    model2, ema2, bm, be = _fresh()
    with pytest.raises(ValueError, match="NaN/inf"):
        polyak.load(path, ema2, model=model2)
    _assert_untouched(model2, ema2, bm, be)


def test_inf_in_model_refused_before_anything_changes(tmp_path: Path, model: nn.Module) -> None:
    ema = polyak.EMA(model, decay=0.9)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    raw["4.bias"][0] = float("inf")
    path = polyak.save(tmp_path / "inf.safetensors", ema, model=raw)
    model2, ema2, bm, be = _fresh()
    with pytest.raises(ValueError, match="NaN/inf"):
        polyak.load(path, ema2, model=model2)
    _assert_untouched(model2, ema2, bm, be)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_malicious_pickle_never_runs(tmp_path: Path, model: nn.Module, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict_ema": model.state_dict(), "x": _Exploit(str(marker))}
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    ema = polyak.EMA(model, decay=0.9)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        polyak.load(path, ema)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        polyak.io.from_peer(path, model)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        polyak.io.read(tmp_path / "nope.safetensors")


def test_directory_path(tmp_path: Path, model: nn.Module) -> None:
    ema = polyak.EMA(model, decay=0.9)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        polyak.save(tmp_path, ema)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        polyak.load(tmp_path, ema)


def test_unwritable_directory(tmp_path: Path, model: nn.Module) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions")
        with pytest.raises(PermissionError, match="not writable"):
            polyak.save(locked / "x.safetensors", polyak.EMA(model, decay=0.9))
    finally:
        locked.chmod(0o700)


def test_unwritable_destination_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> None:
    """As root the permission bits are ignored, so simulate a read-only directory/filesystem too: the
    check refuses it, and a create that fails anyway (EROFS) leaves the old file and no temp file."""
    ema = polyak.EMA(model, decay=0.9)
    path = polyak.save(tmp_path / "c.safetensors", ema)
    old = path.read_bytes()
    ema.update()
    monkeypatch.setattr(_atomic.os, "access", lambda *_args, **_kw: False)
    with pytest.raises(PermissionError, match="not writable"):
        polyak.save(path, ema)
    monkeypatch.undo()

    def read_only(*_args: object, **_kw: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="Read-only"):
        polyak.save(path, ema)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_disk_full_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module, suffix: str
) -> None:
    ema = polyak.EMA(model, decay=0.9)
    path = polyak.save(tmp_path / f"c{suffix}", ema, model=model)
    old = path.read_bytes()
    ema.update()
    monkeypatch.setattr(_atomic, "CHUNK_BYTES", 64)  # many chunks, so the failure is mid-file
    calls = {"n": 0}
    real = _atomic._write_chunk

    def full_disk(handle, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, chunk)

    monkeypatch.setattr(_atomic, "_write_chunk", full_disk)
    with pytest.raises(OSError, match="No space left"):
        polyak.save(path, ema, model=model)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert polyak.io.read(path).ema["step"] == 0


def test_missing_section(saved) -> None:
    path, _ = saved
    model = make_model(0)
    with pytest.raises(ValueError, match="no optimizer state"):
        polyak.load(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_unsupported_extra_for_safetensors(tmp_path: Path, model: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"cannot store object at 'extra.thing'"):
        polyak.save(tmp_path / "x.safetensors", polyak.EMA(model, decay=0.9), extra={"thing": object()})
    assert list(tmp_path.iterdir()) == []


def test_optimizer_mismatch_changes_nothing(tmp_path: Path, model: nn.Module) -> None:
    ema = polyak.EMA(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    ema.update()
    path = polyak.save(tmp_path / "c.safetensors", ema, model=model, optimizer=opt)
    model2, ema2, bm, be = _fresh()
    opt2 = torch.optim.AdamW(list(model2.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="group 0 holds 6 parameters in the file and 2 here"):
        polyak.load(path, ema2, model=model2, optimizer=opt2)
    _assert_untouched(model2, ema2, bm, be)
    assert opt2.state_dict()["state"] == {}


_WRITER = """
import sys, torch, polyak
from torch import nn
model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)])  # 24 MiB of weights per copy
ema = polyak.EMA(model, decay=0.9)
print("ready", flush=True)
step = 0
while True:
    step += 1
    ema.update()
    polyak.save(sys.argv[1], ema, model=model)
"""


def test_kill_mid_write_leaves_a_complete_file(tmp_path: Path) -> None:
    """SIGKILL a process that saves in a loop: whatever moment it dies, the file on disk is a complete,
    checksummed checkpoint (the old or the new one, never a mix). Only a stale hidden temp file may stay."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "live.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        # kill while a later write is in flight: its temporary file exists, the rename has not happened
        while not any(p.suffix == ".tmp" for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    ckpt = polyak.io.read(path)  # verifies size and sha256
    assert ckpt.ema is not None
    assert ckpt.ema["step"] >= 1
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert leftovers, "the kill did not land mid-write; the test proved nothing"
    assert all(name.startswith(".live.safetensors.") and name.endswith(".tmp") for name in leftovers)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"], ids=["pickle-like", "zip-like"])
def test_safetensors_header_length_that_looks_like_torch(tmp_path: Path, first_bytes: bytes) -> None:
    """Regression (found by the hypothesis test): a header length whose bytes read ``\\x80`` or ``PK``
    must not send a safetensors file to torch.load."""
    target = int.from_bytes(first_bytes.ljust(2, b"\x00"), "little") if first_bytes == b"PK" else 0x80 + 256 * 8
    path = tmp_path / "x.safetensors"
    base = len(polyak.save(path, extra={"s": ""}).read_bytes()[8:].split(b"}", 1)[0])
    for n in range(max(0, target - base - 400), target - base + 400):
        polyak.save(path, extra={"s": "x" * n})
        if path.read_bytes().startswith(first_bytes):
            break
    else:
        pytest.fail("could not build a header of the wanted length")
    assert polyak.io.read(path).extra == {"s": "x" * n}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ema_round_trips_through_cpu_file(tmp_path: Path) -> None:
    model = make_model(0).cuda()
    ema = polyak.EMA(model, decay=0.9)
    model(torch.randn(4, 4, device="cuda")).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad)
    ema.update()
    path = polyak.save(tmp_path / "c.safetensors", ema, model=model)
    model2 = make_model(1).cuda()
    ema2 = polyak.EMA(model2, decay=0.9)
    polyak.load(path, ema2, model=model2)
    for key, value in ema.averaged_state_dict().items():
        assert value.device.type == "cuda"
        assert torch.equal(ema2.averaged_state_dict()[key], value), key
