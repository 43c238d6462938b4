"""The EMA in ``torch.distributed.checkpoint`` (the ``Stateful`` protocol): a sharded EMA saved at world 2
loads at world 3, and at world 1 in a process without a process group into a plain EMA of the plain
model, bit for bit; a plain EMA saved without a process group loads into a sharded EMA at world 2."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import polyak
from polyak.io import _atomic
from tests.distributed.harness import mesh_1d, requires_distributed, run_world
from tests.distributed.test_fsdp import _model
from tests.distributed.toy import DECAYS, STEPS, train_whole_batches
from tests.distributed.toy import batches as _data
from tests.distributed.toy import sgd_step as _step

# DCP warns when it runs without a process group, which is what these tests ask of it
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _full_state(ema: polyak.EMA) -> dict[str, Any]:
    """The EMA's state with every DTensor gathered (a collective)."""
    state = ema.state_dict()
    state["averages"] = [
        {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in a.items()} for a in state["averages"]
    ]
    return state


def _trained_plain(steps: int) -> polyak.EMA:
    return train_whole_batches(_model(), steps)


def _sharded(world: int) -> tuple[torch.nn.Module, polyak.EMA]:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=mesh_1d(world))
    return model, polyak.EMA(model, decay=DECAYS)


def _no_space(handle: Any, chunk: memoryview) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_and_load_run(rank: int, world: int, saved: str, plain: str) -> dict[str, Any]:
    model, ema = _sharded(world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = _data()
    for i in range(STEPS):
        _step(model, opt, xs[i].chunk(world)[rank], ys[i].chunk(world)[rank])
        ema.update()
    state = ema.state_dict()
    assert all(hasattr(v, "full_tensor") for a in state["averages"] for v in a.values())
    assert isinstance(state["step"], int)
    assert isinstance(state["products"], list)
    dcp.save({"ema": ema}, checkpoint_id=saved)

    _, from_plain = _sharded(world)  # world 1 (no process group) -> world 2
    dcp.load({"ema": from_plain}, checkpoint_id=plain)
    # a full plain state loads too: each rank takes its part, no collective
    _, from_full = _sharded(world)
    from_full.load_state_dict(torch.load(Path(plain).parent / "plain_state.pt", weights_only=True))
    # a model load through DCP's state-dict API: the EMA keeps following the shards it writes
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    follower = polyak.EMA(model, decay=0.0)
    fresh = {k: torch.full_like(v, 0.25) for k, v in _model().state_dict().items()}
    set_model_state_dict(model, dict(fresh), options=StateDictOptions(full_state_dict=True))
    follower.update()
    for key, value in follower.averaged_state_dict(full=True).items():
        assert torch.equal(value, fresh[key]), key

    # polyak.save: a collective that writes one standard file from rank 0, model and optimizer included
    out = Path(saved).parent
    for name in ("sharded.safetensors", "sharded.pt"):
        polyak.save(out / name, ema, model=model, optimizer=opt)
    # a failed write on rank 0 (full disk) raises there, and the other ranks finish their gathers
    full_disk = out / "full-disk.safetensors"
    original = _atomic._write_chunk
    if rank == 0:
        _atomic._write_chunk = _no_space  # type: ignore[assignment]
    try:
        if rank == 0:
            with pytest.raises(OSError, match="No space left"):
                polyak.save(full_disk, ema, model=model)
        else:
            polyak.save(full_disk, ema, model=model)
    finally:
        _atomic._write_chunk = original  # type: ignore[assignment]
    assert not full_disk.exists()
    dist.barrier()

    # polyak.load of a standard file into a sharded EMA: each rank takes its part, no collective
    _, from_file = _sharded(world)
    polyak.load(out / "plain.safetensors", from_file)
    with pytest.raises(ValueError, match="torch.distributed.checkpoint"):
        polyak.load(out / "plain.safetensors", model=model)
    return {
        "saved": _full_state(ema),
        "from_plain": _full_state(from_plain),
        "from_full": _full_state(from_full),
        "from_file": _full_state(from_file),
        "model": {k: v.full_tensor() for k, v in model.state_dict().items()},
    }


def _load_run(rank: int, world: int, saved: str) -> dict[str, Any]:
    _, ema = _sharded(world)
    dcp.load({"ema": ema}, checkpoint_id=saved)
    return _full_state(ema)


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("step", "skipped_updates", "products", "last_decays", "config"):
        assert a[key] == b[key], key
    assert len(a["averages"]) == len(b["averages"])
    for x, y in zip(a["averages"], b["averages"]):
        assert sorted(x) == sorted(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


def _resharding(tmp_path: Path) -> dict[str, Any]:
    plain = _trained_plain(3)
    plain_dir = tmp_path / "plain"
    dcp.save({"ema": plain}, checkpoint_id=plain_dir, no_dist=True)
    torch.save(plain.state_dict(), tmp_path / "plain_state.pt")
    polyak.save(tmp_path / "plain.safetensors", plain, model=plain.model)
    saved = tmp_path / "sharded"
    r0, r1 = run_world(_save_and_load_run, 2, tmp_path, str(saved), str(plain_dir))
    for r in (r0, r1):
        for key in ("from_plain", "from_full", "from_file"):
            _assert_same(r[key], plain.state_dict())
    _assert_same(r0["saved"], r1["saved"])

    # the file written from rank 0 loads into a plain single-process EMA, and its model section too
    for name in ("sharded.safetensors", "sharded.pt"):
        model = _model()
        ema = polyak.EMA(model, decay=DECAYS)
        polyak.load(tmp_path / name, ema, model=model)
        _assert_same(ema.state_dict(), r0["saved"])
        for key, value in model.state_dict().items():
            assert torch.equal(value, r0["model"][key]), key

    # world 2 -> world 1, in this process: no process group, a plain EMA of the plain model
    loaded = polyak.EMA(_model(), decay=DECAYS)
    dcp.load({"ema": loaded}, checkpoint_id=saved, no_dist=True)
    _assert_same(loaded.state_dict(), r0["saved"])
    assert loaded.step == STEPS
    return {"saved": saved, "state": r0["saved"]}


@requires_distributed
@single_process
def test_dcp_reshards_between_world_sizes(tmp_path: Path) -> None:
    _resharding(tmp_path)


@requires_distributed
@single_process
@pytest.mark.slow
def test_dcp_saved_at_world_two_loads_at_world_three(tmp_path: Path) -> None:
    done = _resharding(tmp_path)
    for r in run_world(_load_run, 3, tmp_path, str(done["saved"])):
        _assert_same(r, done["state"])
