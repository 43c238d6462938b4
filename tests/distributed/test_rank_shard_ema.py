"""``EMA(model, shard=True)`` under DDP on a gloo CPU group: each rank keeps ``ceil(N / world)`` columns of
every shadow group, updates with no collective, and every full value it gives back (``apply``,
``copy_to``, ``averaged_state_dict(full=True)``, ``polyak.save``, DCP at another world size) is the
replicated EMA's, bit for bit, and a single-process EMA's trained on the whole batch within 1e-6."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import polyak
from polyak._rank_shard import FlatRangeShard
from tests.distributed.harness import collectives, mesh_1d, requires_distributed, run_world
from tests.distributed.toy import DECAYS, STEPS, train_whole_batches
from tests.distributed.toy import batches as _data
from tests.distributed.toy import sgd_step as _step

PARAMETERS = {f"{m}.{p}" for m in ("a", "bn", "b", "head") for p in ("weight", "bias")}

# DCP warns when it runs without a process group, which is what the world-1 loads ask of it
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class _Net(nn.Module):
    """Dims 5 and 1 (uneven and empty column ranges), a BatchNorm (averaged float buffers, a copied
    integer one), and a float64 head: two shadow groups."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5) if bn else nn.Identity()
        self.b = nn.Linear(5, 1)
        self.head = nn.Linear(1, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.tanh(self.bn(self.a(x)))).double()).float()


def _model(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return _Net(bn)


def _single_process() -> list[dict[str, torch.Tensor]]:
    """A single-process EMA of the same model trained on the whole batch (without the BatchNorm, which
    normalises each DDP rank's part of the batch by its own statistics)."""
    ema = train_whole_batches(_model(bn=False))
    return [ema.averaged_state_dict(k) for k in range(len(DECAYS))]


def _trained(rank: int, world: int, bn: bool = True) -> tuple[nn.Module, DDP, polyak.EMA, polyak.EMA, list[int]]:
    model = _model(bn)
    ddp = DDP(model)
    replicated = polyak.EMA(ddp, decay=DECAYS)
    sharded = polyak.EMA(ddp, decay=DECAYS, shard=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs, ys = _data()
    counts = []
    for i in range(STEPS):
        _step(ddp, opt, xs[i].chunk(world)[rank], ys[i].chunk(world)[rank])
        replicated.update()
        counts.append(collectives(sharded.update)[0])
    return model, ddp, replicated, sharded, counts


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(rank: int, world: int, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # without BatchNorm, DDP's replicas train as one process on the whole batch would
    _, _, plain, split, _ = _trained(rank, world, bn=False)
    out["whole_batch"] = [split.averaged_state_dict(k, full=True) for k in range(len(DECAYS))]
    out["whole_batch_replicated"] = [plain.averaged_state_dict(k) for k in range(len(DECAYS))]
    model, ddp, replicated, sharded, counts = _trained(rank, world)
    out["update_collectives"] = counts
    out["repr"] = repr(sharded)
    # memory: each group keeps this rank's torch.chunk columns of the parameters (and the buffers whole)
    out["columns"] = [
        (
            sum(s.numel() for k, s in zip(g.keys, g.sources) if "running" not in k),  # this rank's columns
            sum(s.numel() for k, s in zip(r.keys, r.sources) if "running" not in k),  # all the parameters
            g.flat.shape[1] - sum(s.numel() for k, s in zip(g.keys, g.sources) if "running" in k),  # the buffer
            g.flat.shape[0],
        )
        for g, r in zip(sharded._groups, replicated._groups)
    ]
    # the shards laid side by side are the replicated rows, bit for bit (full=True gathers them)
    reference = [replicated.averaged_state_dict(k) for k in range(len(DECAYS))]
    out["reference"] = reference
    fulls = []
    for k in range(len(DECAYS)):
        n, full = collectives(lambda k=k: sharded.averaged_state_dict(k, full=True))
        fulls.append(full)
        out[f"full_collectives_{k}"] = n
    out["full_equal"] = all(_equal(f, r) for f, r in zip(fulls, reference)) if rank == 0 else fulls
    local = sharded.averaged_state_dict()
    out["local_types"] = {k.removeprefix("module."): type(v).__name__ for k, v in local.items()}
    # apply: one all-gather per shadow group into the live weights, restored exactly on exit
    live = {k: v.clone() for k, v in ddp.state_dict().items()}
    with CommDebugMode() as comm, sharded.apply(1):
        out["applied"] = _equal(ddp.state_dict(), reference[1])
    out["apply_collectives"] = comm.get_total_counts()
    out["restored"] = _equal(ddp.state_dict(), live)
    try:
        with sharded.apply(0):
            out["in_block"] = _equal(ddp.state_dict(), reference[0])
            raise KeyError("inside the block")
    except KeyError:
        out["restored_after_error"] = _equal(ddp.state_dict(), live)
    # copy_to: the whole average into another model (a collective)
    other = _model()
    n, _ = collectives(lambda: sharded.copy_to(other, 1))
    out["copy_to"] = (n, _equal(other.state_dict(), {k.removeprefix("module."): v for k, v in reference[1].items()}))
    # a re-pointed p.data is followed (the live tensor is compared, not the cached slice)
    with torch.no_grad():
        model.a.weight.data = model.a.weight.data.clone()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs, ys = _data()
    _step(ddp, opt, xs[0].chunk(world)[rank], ys[0].chunk(world)[rank])
    replicated.update()
    sharded.update()
    followed = sharded.averaged_state_dict(0, full=True)
    out["repointed_followed"] = _equal(followed, replicated.averaged_state_dict(0)) if rank == 0 else followed == {}
    # files: polyak.save writes one standard file from rank 0 (a collective); DCP writes every rank's ranges
    n, _ = collectives(lambda: polyak.save(f"{tmp}/ema.safetensors", sharded))
    out["save_collectives"] = n
    polyak.save(f"{tmp}/ema.pt", sharded)  # the torch format: gathered into rank 0's memory first
    state = sharded.state_dict()
    out["state_types"] = {k for a in state["averages"] for k, v in a.items() if isinstance(v, FlatRangeShard)}
    dcp.save({"ema": sharded}, checkpoint_id=f"{tmp}/dcp")
    out["final_reference"] = [replicated.averaged_state_dict(k) for k in range(len(DECAYS))]
    out["final_state"] = replicated.state_dict()
    # a standard state (full tensors) loads into a sharded EMA: each rank takes its part, no collective
    fresh = polyak.EMA(DDP(_model()), decay=DECAYS, shard=True)
    n, _ = collectives(lambda: fresh.load_state_dict(replicated.state_dict()))
    got = fresh.averaged_state_dict(1, full=True)
    want = replicated.averaged_state_dict(1)
    got.pop("module.bn.num_batches_tracked", None)  # the live counts of two models, not averaged
    want.pop("module.bn.num_batches_tracked")
    out["load_full"] = (n, _equal(got, want) if rank == 0 else got == {})
    # a NaN in a tensor whose columns one rank holds: every rank checks the whole (replicated) weights,
    # so every rank skips that update, with no collective
    skipping = polyak.EMA(ddp, decay=DECAYS, shard=True, nonfinite="skip")
    before = [v.clone() for g in skipping._groups for v in g.flat]
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    n, _ = collectives(skipping.update)
    out["skip"] = (n, skipping.skipped_updates, skipping.step)
    out["skip_unchanged"] = all(
        torch.equal(a, b) for a, b in zip(before, (v for g in skipping._groups for v in g.flat))
    )
    # the same with the verdict as a device flag (the CUDA path, forced on CPU): read at synchronize()
    polyak.EMA._check_on_device = lambda self: True  # type: ignore[method-assign]  # this process only
    with torch.no_grad():
        model.head.bias.fill_(0.0)
    flagged = polyak.EMA(ddp, decay=DECAYS, shard=True, nonfinite="skip")
    before = [v.clone() for g in flagged._groups for v in g.flat]
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    n, _ = collectives(flagged.update)
    flagged.synchronize()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, (v for g in flagged._groups for v in g.flat)))
    out["skip_on_device"] = (flagged._device is not None, n, flagged.skipped_updates, unchanged)
    out["nan_on_this_rank"] = any(
        k == "head.bias" for g in skipping._groups for k, v in zip(g.keys, g.views[0]) if v.numel()
    )
    # module(): refused (each rank holds a part)
    try:
        sharded.module()
    except ValueError as e:
        out["module_error"] = str(e)
    # refusals
    errors = {}
    for kwargs in ({"flatten": True}, {"capturable": True}, {"shard": 1}):
        try:
            polyak.EMA(_model(), **{"shard": True, **kwargs})
        except (TypeError, ValueError) as e:
            errors[next(iter(kwargs))] = f"{type(e).__name__}: {e}"
    from torch.distributed.fsdp import fully_shard

    fsdp = _model()
    fully_shard(fsdp, mesh=mesh_1d(world))
    try:
        polyak.EMA(fsdp, shard=True)
    except ValueError as e:
        errors["dtensor"] = str(e)
    out["errors"] = errors
    return out


def _check(results: list[dict[str, Any]], world: int) -> None:
    whole_batch = _single_process()
    for rank, r in enumerate(results):
        assert r["update_collectives"] == [0] * STEPS
        assert r["repr"].endswith(f"shard over {world} ranks)")
        for local, full, in_buffer, k in r["columns"]:  # BatchNorm statistics stay whole on every rank
            c = math.ceil(full / world)
            assert local == in_buffer == max(0, min(c, full - rank * c))
            assert k == len(DECAYS)
        assert r["full_collectives_0"] == r["full_collectives_1"] == 8  # one all-gather per parameter
        # parameters as this rank's ranges (for DCP), buffers whole
        assert {k for k, v in r["local_types"].items() if v == FlatRangeShard.__name__} == PARAMETERS
        assert r["apply_collectives"] == 2  # one all-gather per shadow group (float32, float64)
        assert r["applied"]
        assert r["restored"]
        assert r["in_block"]
        assert r["restored_after_error"]
        assert r["copy_to"] == (2, True)
        assert r["repointed_followed"]
        assert r["save_collectives"] >= 2 * 8  # a gather per parameter and average
        assert r["state_types"] == PARAMETERS
        assert r["load_full"][0] == 0
        assert r["load_full"][1]
        assert r["skip"] == (0, 1, 1)
        assert r["skip_unchanged"]
        assert r["skip_on_device"] == (True, 0, 1, True)
        assert "ema.module()" in r["module_error"]
        assert "flatten=True" in r["errors"]["flatten"]
        assert "capturable=True" in r["errors"]["capturable"]
        assert r["errors"]["shard"].startswith("TypeError: shard must be False, True")
        assert "already sharded" in r["errors"]["dtensor"]
    assert [r["nan_on_this_rank"] for r in results].count(True) == 1  # yet every rank skipped that update
    assert results[0]["full_equal"] is True
    for k in range(len(DECAYS)):
        assert _equal(results[0]["whole_batch"][k], results[0]["whole_batch_replicated"][k])
        assert all(r["whole_batch"][k] == {} for r in results[1:])
        for key, value in whole_batch[k].items():
            torch.testing.assert_close(results[0]["whole_batch"][k]["module." + key], value, rtol=0, atol=1e-6)


def _plain_ema_of_files(tmp: Path, states: list[dict[str, Any]]) -> None:
    """World size 1, no process group: polyak.load of the files rank 0 wrote, and DCP's checkpoint of
    every rank's ranges, each into a plain EMA: the replicated EMA's state, bit for bit. The buffers (whole
    on every rank, each rank's own BatchNorm statistics) are rank 0's in the file; DCP keeps one rank's
    copy of a tensor every rank holds whole."""
    file = polyak.EMA(_model(), decay=DECAYS)
    polyak.load(tmp / "ema.safetensors", file)
    torch_file = polyak.EMA(_model(), decay=DECAYS)
    polyak.load(tmp / "ema.pt", torch_file)
    checkpoint = polyak.EMA(_model(), decay=DECAYS)
    dcp.load({"ema": checkpoint}, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    for plain, exact in ((file, True), (torch_file, True), (checkpoint, False)):
        loaded, state = plain.state_dict(), states[0]
        assert (loaded["step"], loaded["products"], loaded["last_decays"]) == (
            state["step"],
            state["products"],
            state["last_decays"],
        )
        for k in range(len(DECAYS)):
            for key, value in loaded["averages"][k].items():
                if exact or key in PARAMETERS:
                    assert torch.equal(value, state["averages"][k][key]), key
                else:
                    assert any(torch.equal(value, s["averages"][k][key]) for s in states), key


@requires_distributed
@single_process
def test_ddp_rank_sharded_ema_at_world_two(tmp_path: Path) -> None:
    results = run_world(_run, 2, tmp_path, str(tmp_path))
    _check(results, 2)
    _plain_ema_of_files(tmp_path, [r["final_state"] for r in results])


def _load_at_three(rank: int, world: int, tmp: str) -> dict[str, Any]:
    ema = polyak.EMA(DDP(_model()), decay=DECAYS, shard=True)
    dcp.load({"ema": ema}, checkpoint_id=f"{tmp}/dcp")
    from_dcp = [ema.averaged_state_dict(k, full=True) for k in range(len(DECAYS))]
    step = ema.step
    ema = polyak.EMA(DDP(_model()), decay=DECAYS, shard=True)
    polyak.load(f"{tmp}/ema.safetensors", ema)
    from_file = [ema.averaged_state_dict(k, full=True) for k in range(len(DECAYS))]
    return {"dcp": from_dcp, "file": from_file, "step": step}


@requires_distributed
@pytest.mark.slow
@single_process
def test_world_three_matches_and_reshards_from_two(tmp_path: Path) -> None:
    three = run_world(_run, 3, tmp_path / "three", str(tmp_path / "three"))
    _check(three, 3)
    _plain_ema_of_files(tmp_path / "three", [r["final_state"] for r in three])
    two = run_world(_run, 2, tmp_path, str(tmp_path))
    loaded = run_world(_load_at_three, 3, tmp_path, str(tmp_path))
    assert loaded[0]["step"] == two[0]["final_state"]["step"]
    buffers = [f"module.bn.running_{s}" for s in ("mean", "var")]
    for k in range(len(DECAYS)):
        reference = two[0]["final_reference"][k]
        for key in ["module." + p for p in PARAMETERS] + buffers:
            assert torch.equal(loaded[0]["file"][k][key], reference[key]), key
            if key in buffers:  # one rank's copy (see _plain_ema_of_files)
                assert any(torch.equal(loaded[0]["dcp"][k][key], r["final_reference"][k][key]) for r in two), key
            else:
                assert torch.equal(loaded[0]["dcp"][k][key], reference[key]), key
    assert all(r["dcp"] == [{}, {}] and r["file"] == [{}, {}] for r in loaded[1:])
