"""EMA over DTensor models on a gloo CPU group: FSDP2 (uneven and empty shards), tensor parallel (Shard(1)
placements), and an HSDP-shaped 2-D mesh. Every rank averages its own shards with no collective, and the
gathered average equals a single-process EMA of the same model trained on the whole batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import polyak
from tests.distributed.harness import collectives, mesh_1d, requires_distributed, run_world
from tests.distributed.toy import DECAYS, STEPS, train_whole_batches
from tests.distributed.toy import batches as _data
from tests.distributed.toy import sgd_step as _step


def _model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    # dims 5 and 1: shards of 3/2 rows at world 2, and an empty shard of the (1, 5) weight on rank 1
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def _reference(hidden: int = 5) -> dict[str, Any]:
    """A single-process EMA of the same model trained on the whole batch."""
    model = _model(hidden)
    ema = train_whole_batches(model)
    xs, _ = _data()
    with ema.apply(1):
        out1 = model(xs[0]).detach()
    return {"avg": [ema.averaged_state_dict(k) for k in range(2)], "out1": out1, "live": model(xs[0]).detach()}


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fsdp_run(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = mesh_1d(world)
    model = _model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root holds model[2]: unsharded after a no_grad forward
    ema = polyak.EMA(model, decay=DECAYS)  # before the first forward (FSDP2's lazy init follows)
    shapes = [tuple(p.to_local().shape) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = _data()
    counts = []
    for i in range(STEPS):
        _step(model, opt, xs[i].chunk(world)[rank], ys[i].chunk(world)[rank])
        counts.append(collectives(ema.update)[0])
    assert counts == [0] * STEPS, counts
    readers = [g.reader for g in ema._groups]
    with torch.no_grad():  # built after a no_grad forward, which left the root's parameters unsharded
        model(xs[0])
    assert sorted(polyak.EMA(model)._shards.placements) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # type: ignore[union-attr]
    ema._check_model_unchanged()  # nothing re-pointed: readers kept (to_local() is a fresh view per call)
    assert [g.reader for g in ema._groups] == readers
    out: dict[str, Any] = {"shapes": shapes}

    sharded = ema.averaged_state_dict(0)
    assert all(_is_dtensor(v) for v in sharded.values()), {k: type(v) for k, v in sharded.items()}
    assert [tuple(v.shape) for v in sharded.values()] == [(5, 5), (5,), (1, 5), (1,)]
    out["full"] = [ema.averaged_state_dict(k, full=True) for k in range(2)]
    assert (out["full"][0] == {}) == (rank != 0)

    # apply: the forward inside the block gathers the averaged weights; on exit the root is resharded
    live = [p.to_local().clone() for p in model.parameters()]
    with torch.no_grad():
        before = model(xs[0])
    with ema.apply(1), torch.no_grad():
        out["out1"] = model(xs[0])
    assert all(_is_dtensor(p) for p in model[2]._parameters.values()), "the root kept unsharded weights"
    assert all(torch.equal(p.to_local(), v) for p, v in zip(model.parameters(), live))
    with torch.no_grad():  # the next forward uses the live weights, not unsharded averaged ones
        assert torch.equal(model(xs[0]), before)
    out["before"] = before
    model.reshard()  # type: ignore[operator]

    # FSDP2 re-points a local shard (lazy init, a state-dict load) by assigning DTensor._local_tensor
    # (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, reset_sharded_param): the EMA follows it
    follow = polyak.EMA(model, decay=0.0)
    weight = model[0].weight
    original = weight.to_local()
    weight._local_tensor = original.detach().clone() + 1  # type: ignore[attr-defined]
    follow.update()
    assert torch.equal(follow.state_dict()["averages"][0]["0.weight"].to_local(), original + 1)
    weight._local_tensor = original  # type: ignore[attr-defined]

    # FSDP2's unsharded state: a specific error naming model.reshard(), then the update works once resharded
    with torch.no_grad():
        model(xs[0])
    assert not _is_dtensor(model[2].weight)
    with pytest.raises(ValueError, match=r"FSDP2 holds unsharded parameters.*model\.reshard\(\)"):
        ema.update()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    ema.update()

    # "raise" and "ignore" issue no collective; "skip" agrees with ONE all-reduce when one rank sees a NaN
    ema_ignore = polyak.EMA(model, decay=0.9, nonfinite="ignore")
    assert collectives(ema_ignore.update)[0] == 0
    ema_skip = polyak.EMA(model, decay=0.9, nonfinite="skip")
    on_device = polyak.EMA(model, decay=0.9, nonfinite="skip", capturable=True)  # the flag stays a tensor
    saved = ema_skip.state_dict()
    local = model[0].weight.to_local()
    if rank == 1:
        with torch.no_grad():
            local[0, 0] = float("nan")
    out["skip_comms"] = collectives(ema_skip.update)[0]
    assert ema_skip.skipped_updates == 1, ema_skip.skipped_updates
    on_device.update()
    on_device.synchronize()
    assert on_device.skipped_updates == 1, on_device.skipped_updates
    assert all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(saved["averages"][0].values(), on_device.state_dict()["averages"][0].values())
    )
    with torch.no_grad():
        local.copy_(saved["averages"][0]["0.weight"].to_local())
    after = ema_skip.state_dict()
    assert all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(saved["averages"][0].values(), after["averages"][0].values())
    )

    # copy_to: into a model sharded alike (local shards written), refused into an unsharded one
    twin = _model()
    fully_shard(twin, mesh=mesh)
    ema.copy_to(twin, index=1)
    averaged = ema.averaged_state_dict(1)
    assert all(torch.equal(v.to_local(), averaged[k].to_local()) for k, v in twin.state_dict().items())
    with pytest.raises(ValueError, match="not sharded the same way"):
        ema.copy_to(_model())

    errors = []
    for build in (
        lambda: polyak.EMA(model, flatten=True),
        lambda: ema.module(),
        lambda: polyak.Teacher(model),
    ):
        try:
            build()
        except ValueError as exc:
            errors.append(str(exc))
    out["errors"] = errors

    # a sharding wrapper applied after the EMA was built keeps its own error
    late = _model()
    late_ema = polyak.EMA(late)
    fully_shard(late, mesh=mesh)
    try:
        late_ema.update()
        raise AssertionError("no error after sharding the model under the EMA")
    except ValueError as exc:
        out["late"] = str(exc)
    return out


@requires_distributed
def test_fsdp2_shards_average_locally_and_match_one_process(tmp_path: Path) -> None:
    ref = _reference()
    results = run_world(_fsdp_run, 2, tmp_path)
    assert results[0]["shapes"] == [(3, 5), (3,), (1, 5), (1,)]
    assert results[1]["shapes"] == [(2, 5), (2,), (0, 5), (0,)]
    for k in range(2):
        full = results[0]["full"][k]
        assert sorted(full) == sorted(ref["avg"][k])
        for key, value in ref["avg"][k].items():
            assert not _is_dtensor(full[key])
            assert full[key].device.type == "cpu"
            torch.testing.assert_close(full[key], value, atol=1e-6, rtol=0)
    for _rank, r in enumerate(results):
        torch.testing.assert_close(r["out1"], ref["out1"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["before"], ref["live"], atol=1e-6, rtol=0)
        assert r["skip_comms"] == 1
        flatten, module, teacher = r["errors"]
        assert "flatten=False" in flatten
        assert "ema.apply()" in module
        assert "averaged_state_dict(full=True)" in module
        assert "DTensors" in teacher
        assert "Build the EMA after sharding the model" in r["late"], r["late"]


def _train_and_gather(model: nn.Module, rank: int, shards: int) -> dict[str, Any]:
    """Train with the data split over ``shards`` data-parallel ranks (1: every rank sees the whole batch);
    return the zero-collective checks' counts and the gathered averages."""
    ema = polyak.EMA(model, decay=DECAYS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = _data()
    counts = []
    for i in range(STEPS):
        part = rank % shards
        _step(model, opt, xs[i].chunk(shards)[part], ys[i].chunk(shards)[part])
        counts.append(collectives(ema.update)[0])
    with ema.apply(1), torch.no_grad():
        out1 = model(xs[0])
    placements = [str(tuple(p.placements)) for p in model.parameters()]
    full = [ema.averaged_state_dict(k, full=True) for k in range(2)]
    return {"counts": counts, "full": full, "out1": out1, "placements": placements}


def _placements_run(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    out: dict[str, Any] = {}
    tp = parallelize_module(_model(6), mesh_1d(world), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    out["tp"] = _train_and_gather(tp, rank, shards=1)
    for shape in ((world, 1), (1, world)):  # HSDP: replicate over dim 0, shard over dim 1
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        hsdp = _model()
        fully_shard(hsdp, mesh=mesh)
        out[f"hsdp{shape}"] = _train_and_gather(hsdp, rank, shards=world)
    return out


@requires_distributed
def test_tensor_parallel_and_hsdp_placements_match_one_process(tmp_path: Path) -> None:
    refs = {"tp": _reference(6), "hsdp": _reference()}
    results = run_world(_placements_run, 2, tmp_path)
    assert results[0]["tp"]["placements"] == ["(Shard(dim=0),)", "(Shard(dim=0),)", "(Shard(dim=1),)", "(Replicate(),)"]
    assert results[0]["hsdp(2, 1)"]["placements"][0] == "(Replicate(), Shard(dim=0))"
    for name in ("tp", "hsdp(2, 1)", "hsdp(1, 2)"):
        ref = refs[name[:4] if name != "tp" else "tp"]
        for rank, r in enumerate(results):
            assert r[name]["counts"] == [0] * STEPS, (name, r[name]["counts"])
            torch.testing.assert_close(r[name]["out1"], ref["out1"], atol=1e-6, rtol=0)
            assert (r[name]["full"][0] == {}) == (rank != 0)
        for k in range(2):
            full = results[0][name]["full"][k]
            assert sorted(full) == sorted(ref["avg"][k]), name
            for key, value in ref["avg"][k].items():
                torch.testing.assert_close(full[key], value, atol=1e-6, rtol=0, msg=f"{name} {key}")
