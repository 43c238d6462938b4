"""The Lightning and Hugging Face callbacks on sharded models (gloo, CPU, 2 ranks), against one process that
trains the same model on the whole batch: FSDP2 (DTensor shards) and DDP with ``EMA(shard=True)`` (each
rank keeps a slice of every shadow group).

Lightning: a real ``Trainer`` with ``ModelParallelStrategy`` (``configure_model`` calls ``fully_shard``)
or ``DDPStrategy``, run inside the ranks that ``run_world`` starts (Lightning sees ``LOCAL_RANK`` and an
initialised process group, so it launches nothing). Hugging Face: accelerate enables FSDP only on accelerators (on a CPU its
``Trainer`` silently falls back to DDP), so the test drives the callback's own event methods, in the order
the ``Trainer`` calls them, around a training loop on an FSDP2 model: every engine call the callback makes
(build, update, swap in/out, save, resume, copy at the end) runs under real sharding.

The layers have 5 and 1 output features, so at world size 2 the shards are uneven (3 + 2 rows) and empty
(1 + 0 rows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.harness import requires_distributed, run_world

pl = pytest.importorskip("lightning.pytorch")

import polyak  # noqa: E402

WORLD = 2
DECAY = 0.8
STEPS_PER_EPOCH = 4  # 32 samples, a global batch of 8 (4 per rank)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g))


TRAIN, VAL = _dataset(32, 1), _dataset(16, 2)


def _shard(net: nn.Sequential, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every DTensor of ``state`` gathered (a collective on every rank)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


@torch.no_grad()
def _loss(net: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return float(nn.functional.mse_loss(net(x), y))


def _reference(steps: int) -> list[dict[str, Any]]:
    """One process, the whole batch: after each step, the averaged weights and the live and averaged val
    losses (``[k - 1]`` is after step ``k``)."""
    net = _net()
    ema = polyak.EMA(net, decay=DECAY)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    out = []
    x, y = TRAIN.tensors
    for step in range(steps):
        batch = slice(8 * (step % STEPS_PER_EPOCH), 8 * (step % STEPS_PER_EPOCH) + 8)
        opt.zero_grad()
        nn.functional.mse_loss(net(x[batch]), y[batch]).backward()
        opt.step()
        ema.update()
        raw = _loss(net, VAL)
        with ema.apply():
            averaged = _loss(net, VAL)
        out.append({"averaged": ema.averaged_state_dict(), "raw_loss": raw, "averaged_loss": averaged})
    return out


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert sorted(got) == sorted(prefix + k for k in want)
    for key, value in want.items():
        torch.testing.assert_close(got[prefix + key], value, rtol=0, atol=1e-6, msg=key)


# --- Lightning: ModelParallelStrategy (FSDP2) and DDPStrategy with EMA(shard=True) -----------------------------
class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ShardedRegressor(Regressor):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.net, FSDPModule):  # fit, then test: called once per stage
            _shard(self.net, self.device_mesh["data_parallel"])


def _loader(data: TensorDataset) -> DataLoader[Any]:
    """This rank's half of every global batch of 8, in order (rank r: samples r, r + 2, ...)."""
    from torch.utils.data.distributed import DistributedSampler

    return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))


def _trainer(kind: str, callback: Any, epochs: int) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    strategy = ModelParallelStrategy(WORLD, 1) if kind == "fsdp2" else DDPStrategy()
    return pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the samplers below split each global batch as the reference does
    )


def _lightning_rank(rank: int, world: int, folder: str, kind: str) -> dict[str, Any]:
    from polyak.integrations._callback import is_sharded
    from polyak.integrations.lightning import EMACallback

    # the process group exists already: with these variables Lightning joins it and launches nothing
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
    out: dict[str, Any] = {}
    loaders = _loader(TRAIN), _loader(VAL)
    make = ShardedRegressor if kind == "fsdp2" else Regressor
    options = {} if kind == "fsdp2" else {"shard": True}

    cb = EMACallback(decay=DECAY, validate_both=True, **options)
    module = make()
    trainer = _trainer(kind, cb, epochs=1)
    trainer.fit(module, *loaders)
    assert cb.ema is not None
    out["step"] = cb.ema.step
    out["sharded"] = is_sharded(cb.ema.state_dict())  # FSDP2: built after configure_model sharded the module
    out["val_loss"] = float(trainer.callback_metrics["val_loss"])
    out["val_loss_ema"] = float(trainer.callback_metrics["val_loss_ema"])
    live = _full(module.state_dict())
    (result,) = trainer.test(module, loaders[1], verbose=False)
    out["test_loss"] = result["test_loss"]
    out["live_restored"] = all(torch.equal(v, live[k]) for k, v in _full(module.state_dict()).items())
    trainer.save_checkpoint(os.path.join(folder, "ckpt"))  # FSDP2: a distributed checkpoint (a directory)
    out["averaged_1"] = cb.ema.averaged_state_dict(full=True)

    resumed_cb = EMACallback(decay=DECAY, save_averaged_at_end=True, **options)
    resumed = make()
    _trainer(kind, resumed_cb, epochs=2).fit(resumed, *loaders, ckpt_path=os.path.join(folder, "ckpt"))
    assert resumed_cb.ema is not None
    out["resumed_step"] = resumed_cb.ema.step
    out["averaged_2"] = resumed_cb.ema.averaged_state_dict(full=True)
    out["model_2"] = _full(resumed.state_dict())  # save_averaged_at_end: the averages, copied shard by shard
    return out


@requires_distributed
@pytest.mark.parametrize("kind", ["fsdp2", "ddp_shard"])
def test_lightning_sharded_strategies_average_like_one_process(tmp_path: Path, kind: str) -> None:
    """``ModelParallelStrategy`` with ``fully_shard`` (DTensor shards) and ``DDPStrategy`` with
    ``EMACallback(shard=True)`` (each rank keeps a slice of every shadow group)."""
    results = run_world(_lightning_rank, WORLD, tmp_path, str(tmp_path), kind)
    reference = _reference(2 * STEPS_PER_EPOCH)
    epoch1, epoch2 = reference[STEPS_PER_EPOCH - 1], reference[-1]
    for r in results:
        assert r["step"] == STEPS_PER_EPOCH
        assert r["resumed_step"] == 2 * STEPS_PER_EPOCH
        assert r["sharded"]
        assert r["live_restored"]
        # validate_both: the raw and the averaged weights, each equal to one process on the whole batch
        assert r["val_loss"] == pytest.approx(epoch1["raw_loss"], abs=1e-6)
        assert r["val_loss_ema"] == pytest.approx(epoch1["averaged_loss"], abs=1e-6)
        assert r["test_loss"] == pytest.approx(epoch1["averaged_loss"], abs=1e-6)
        _close(r["model_2"], epoch2["averaged"], prefix="net.")
    assert abs(epoch1["raw_loss"] - epoch1["averaged_loss"]) > 1e-4  # the checks above can tell them apart
    _close(results[0]["averaged_1"], epoch1["averaged"], prefix="net.")
    _close(results[0]["averaged_2"], epoch2["averaged"], prefix="net.")  # resumed from the checkpoint
    assert results[1]["averaged_1"] == {}  # full=True: rank 0 gets the full state

    # the checkpoint holds the full average (written by rank 0): a plain single-process EMA loads it
    meta = torch.load(tmp_path / "ckpt" / "meta.pt" if kind == "fsdp2" else tmp_path / "ckpt", weights_only=True)
    plain = polyak.EMA(Regressor(), decay=DECAY)
    plain.load_state_dict(meta["polyak_ema"]["ema"])
    assert plain.step == STEPS_PER_EPOCH
    _close(plain.averaged_state_dict(), epoch1["averaged"], prefix="net.")


# --- Hugging Face: the callback's events around an FSDP2 training loop ----------------------------------------
def _hf_rank(rank: int, world: int, folder: str, kind: str) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from polyak.integrations.transformers import EMACallback
    from tests.distributed.harness import mesh_1d

    net = _net()
    trained: nn.Module = net  # the Trainer trains the wrapped model and passes the callbacks the inner one
    if kind == "fsdp2":
        _shard(net, mesh_1d(world))
    else:
        trained = nn.parallel.DistributedDataParallel(net)
    options = {} if kind == "fsdp2" else {"shard": True}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = TRAIN.tensors
    shared = SimpleNamespace(output_dir=folder, load_best_model_at_end=False, should_save=rank == 0)
    # as on a node that does not see rank 0's output directory (or sees it late): rank 0 decides
    unseen = SimpleNamespace(output_dir=os.path.join(folder, "not-here"), load_best_model_at_end=False)
    state, control = TrainerState(), TrainerControl()
    out: dict[str, Any] = {}

    def checkpoint_dir(step: int) -> None:  # the Trainer's save_model: rank 0 creates the directory
        if rank == 0:
            os.makedirs(os.path.join(folder, f"checkpoint-{step}"))
        dist.barrier()

    def steps(cb: Any, upto: int, evaluate_at: int = -1) -> None:
        while state.global_step < upto:
            cb.on_step_begin(shared, state, control)
            opt.zero_grad()
            i = 8 * (state.global_step % STEPS_PER_EPOCH) + rank
            nn.functional.mse_loss(trained(x[i : i + 8 : 2]), y[i : i + 8 : 2]).backward()  # this rank's half
            opt.step()
            state.global_step += 1
            control.should_evaluate = state.global_step == evaluate_at
            cb.on_step_end(shared, state, control, model=net)
            if control.should_evaluate:  # the Trainer's evaluate(): the model's forward gathers the averages
                out["eval_loss"] = _loss(net, VAL)
                control.should_evaluate = False

    cb = EMACallback(decay=DECAY, **options)
    cb.on_train_begin(shared, state, control, model=net)
    steps(cb, upto=2)
    checkpoint_dir(2)
    cb.on_save(unseen if rank == 1 else shared, state, control)  # rank 1 still joins the gathers
    steps(cb, upto=4, evaluate_at=4)
    live = _full(net.state_dict())
    checkpoint_dir(4)
    cb.on_save(shared, state, control)  # swaps the live weights back first
    out["live_restored"] = all(torch.equal(v, live[k]) for k, v in _full(net.state_dict()).items())
    cb.on_train_end(shared, state, control, model=net)

    resumed = EMACallback(decay=DECAY, swap_at_end=True, **options)  # train(resume_from_checkpoint=...)
    resumed.on_train_begin(shared, state, control, model=net)
    assert resumed.ema is not None
    out["resumed_step"] = resumed.ema.step
    steps(resumed, upto=8)
    resumed.on_train_end(shared, state, control, model=net)
    out["step"] = resumed.ema.step
    out["model"] = _full(net.state_dict())  # swap_at_end: the averages, copied shard by shard
    return out


@requires_distributed
@pytest.mark.parametrize("kind", ["fsdp2", "ddp_shard"])
def test_hugging_face_callback_events_on_sharded_models_average_like_one_process(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("transformers")
    from polyak.integrations.transformers import CHECKPOINT_FILE

    results = run_world(_hf_rank, WORLD, tmp_path, str(tmp_path), kind)
    reference = _reference(2 * STEPS_PER_EPOCH)
    assert abs(reference[3]["raw_loss"] - reference[3]["averaged_loss"]) > 1e-4
    for r in results:
        assert r["eval_loss"] == pytest.approx(reference[3]["averaged_loss"], abs=1e-6)  # evaluated averaged
        assert r["live_restored"]
        assert r["resumed_step"] == 4
        assert r["step"] == 8
        _close(r["model"], reference[-1]["averaged"])
    assert not (tmp_path / "not-here").exists()
    for step in (2, 4):  # one standard file each, written by rank 0, that a plain EMA loads
        plain = polyak.EMA(_net(), decay=DECAY)
        polyak.io.load(tmp_path / f"checkpoint-{step}" / CHECKPOINT_FILE, plain)
        assert plain.step == step
        _close(plain.averaged_state_dict(), reference[step - 1]["averaged"])


# --- Hugging Face: a real Trainer under DDP (it runs on a CPU), EMA(shard=True) against a replicated EMA ---
class _HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def _rows(data: TensorDataset) -> list[dict[str, torch.Tensor]]:
    return [{"x": x, "labels": y} for x, y in zip(*data.tensors)]


def _hf_trainer_rank(rank: int, world: int, folder: str) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from polyak.integrations.transformers import EMACallback

    # the process group exists already: accelerate joins it
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    out: dict[str, Any] = {}

    def train(name: str, run: str, resume: str | None = None, **options: Any) -> Any:
        args = TrainingArguments(
            output_dir=os.path.join(folder, run),
            per_device_train_batch_size=4,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        cb = EMACallback(decay=DECAY, **options)
        trainer = Trainer(
            model=_HFNet(), args=args, train_dataset=_rows(TRAIN), eval_dataset=_rows(VAL), callbacks=[cb]
        )
        trainer.train(resume_from_checkpoint=resume)
        out[name] = {
            "eval": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
            "step": cb.ema.step if cb.ema is not None else -1,
            "averaged": cb.ema.averaged_state_dict(full=True) if cb.ema is not None else {},
        }
        return trainer

    train("replicated", "replicated")
    train("sharded", "sharded", shard=True)
    # the callback finds the EMA state in the run's own output_dir; checkpoint-2 and -4 are written again
    train("resumed", "sharded", resume=os.path.join(folder, "sharded", "checkpoint-2"), shard=True)
    return out


@pytest.mark.slow  # a real Trainer in two processes; the callback events above cover the same engine calls
@requires_distributed
def test_hugging_face_trainer_under_ddp_with_a_sharded_ema_equals_a_replicated_one(tmp_path: Path) -> None:
    """A real ``Trainer`` (accelerate's DDP on a CPU): ``EMACallback(shard=True)`` evaluates, checkpoints and
    resumes exactly as the replicated average does."""
    pytest.importorskip("transformers")
    from polyak.integrations.transformers import CHECKPOINT_FILE

    results = run_world(_hf_trainer_rank, WORLD, tmp_path, str(tmp_path))
    for r in results:
        assert r["replicated"]["step"] == r["sharded"]["step"] == r["resumed"]["step"] == 4
        assert len(r["sharded"]["eval"]) == 2
        assert r["sharded"]["eval"] == r["replicated"]["eval"]
        assert r["resumed"]["eval"] == r["sharded"]["eval"]  # the restored history, then step 4 again
    replicated, sharded, resumed = (results[0][k]["averaged"] for k in ("replicated", "sharded", "resumed"))
    assert results[1]["sharded"]["averaged"] == {}  # full=True: rank 0 gets the full state
    for key, value in replicated.items():
        assert torch.equal(sharded[key], value), key
        assert torch.equal(resumed[key], value), key
    for step in (2, 4):  # one standard file per checkpoint, written by rank 0, the same for both kinds
        files = [tmp_path / name / f"checkpoint-{step}" / CHECKPOINT_FILE for name in ("replicated", "sharded")]
        emas = [polyak.EMA(_HFNet(), decay=DECAY) for _ in files]
        for ema, file in zip(emas, files):
            polyak.io.load(file, ema)
        for key, value in emas[0].averaged_state_dict().items():
            assert torch.equal(emas[1].averaged_state_dict()[key], value), key
