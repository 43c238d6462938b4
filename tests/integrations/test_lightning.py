"""EMACallback on real Lightning training runs (CPU, tiny models): logged metrics equal a manual evaluation
of the averaged weights, resume equals an uninterrupted run, the best averaged epoch is checkpointed,
gradient accumulation counts optimizer steps, and the disabled path is bit-identical to no callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from polyak import update_bn  # noqa: E402
from polyak.integrations.lightning import EMACallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty:UserWarning"),
]


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.5 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


TRAIN, VAL = data(64, 1), data(32, 2)


def loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(TRAIN, batch_size=8), DataLoader(VAL, batch_size=8)


def trainer(**kwargs: Any) -> Any:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@torch.no_grad()
def manual_val_loss(model: nn.Module) -> float:
    model.eval()
    losses = [nn.functional.mse_loss(model(x), y) for x, y in DataLoader(VAL, batch_size=8)]
    return float(torch.stack(losses).mean())


def fit(callbacks: list, **kwargs: Any) -> tuple[Regressor, Any]:
    model = Regressor()
    t = trainer(callbacks=callbacks, **kwargs)
    t.fit(model, *loaders())
    return model, t


def test_validate_both_logs_raw_and_averaged_metrics_that_match_a_manual_evaluation() -> None:
    cb = EMACallback(decay=0.8, validate_both=True)
    model, t = fit([cb], max_epochs=2)
    assert cb.ema is not None
    assert cb.ema.step == t.global_step == 16
    raw = manual_val_loss(model)
    with cb.ema.apply():
        averaged = manual_val_loss(model)
    assert abs(raw - averaged) > 1e-4  # the two really differ, so the check below can fail
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(raw, rel=1e-6)
    assert float(t.callback_metrics["val_loss_ema"]) == pytest.approx(averaged, rel=1e-6)


def test_validation_test_and_predict_run_on_the_averaged_weights() -> None:
    cb = EMACallback(decay=0.8)
    model, t = fit([cb], max_epochs=2)
    assert cb.ema is not None
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with cb.ema.apply():
        averaged = manual_val_loss(model)
        expected_pred = torch.cat([model(x) for x, _ in DataLoader(VAL, batch_size=8)])
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(averaged, rel=1e-6)
    (result,) = t.test(model, DataLoader(VAL, batch_size=8), verbose=False)
    assert result["test_loss"] == pytest.approx(averaged, rel=1e-6)
    pred = torch.cat(t.predict(model, DataLoader(VAL, batch_size=8)))
    torch.testing.assert_close(pred, expected_pred)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k  # live weights restored after each evaluation


def test_cold_average_is_not_evaluated() -> None:
    seen: list[tuple[int, float, float]] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            m = trainer.callback_metrics
            seen.append((trainer.current_epoch, float(m["val_loss"]), float(m["val_loss_ema"])))

    cb = EMACallback(decay=0.8, validate_both=True, eval_start_epoch=1)
    fit([cb, Record()], max_epochs=2)
    (e0, raw0, ema0), (e1, raw1, ema1) = seen
    assert (e0, e1) == (0, 1)
    assert ema0 == raw0  # cold: the live value stands in under the _ema name
    assert ema1 != raw1
    cb_steps = EMACallback(decay=0.8, eval_start_step=10**6)
    model, t = fit([cb_steps], max_epochs=1)
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(manual_val_loss(model), rel=1e-6)


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    cb = EMACallback(decay=0.8)
    _, t = fit([cb], max_epochs=1, accumulate_grad_batches=4, limit_val_batches=0)
    assert t.global_step == 2
    assert cb.ema is not None
    assert cb.ema.step == 2


def test_disabled_callback_is_bit_identical_to_no_callback() -> None:
    plain, _ = fit([], max_epochs=2)
    off_cb = EMACallback(decay=0.8, enabled=False, validate_both=True)
    off, t = fit([off_cb], max_epochs=2)
    assert off_cb.ema is None
    assert "val_loss_ema" not in t.callback_metrics
    for (k, a), b in zip(plain.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), k
    on, _ = fit([EMACallback(decay=0.8)], max_epochs=2)
    for (k, a), b in zip(plain.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), k  # the EMA only reads the weights: training itself is unchanged


def test_checkpoint_resume_continue_equals_uninterrupted(tmp_path: Path) -> None:
    full_cb = EMACallback(decay=0.8)
    full, _ = fit([full_cb], max_epochs=4)

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first_cb = EMACallback(decay=0.8)
    fit([first_cb, ckpt], max_epochs=2, enable_checkpointing=True)
    stored = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert stored["polyak_ema"]["ema"]["step"] == 16

    resumed_cb = EMACallback(decay=0.8)
    resumed = Regressor()
    again = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t = trainer(callbacks=[resumed_cb, again], max_epochs=4, enable_checkpointing=True)
    t.fit(resumed, *loaders(), ckpt_path=tmp_path / "last.ckpt")
    assert full_cb.ema is not None
    assert resumed_cb.ema is not None
    assert resumed_cb.ema.step == full_cb.ema.step == 32
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    want, got = full_cb.ema.averaged_state_dict(), resumed_cb.ema.averaged_state_dict()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


def test_model_checkpoint_keeps_the_best_averaged_epoch(tmp_path: Path) -> None:
    history: list[float] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            history.append(float(trainer.callback_metrics["val_loss_ema"]))

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss_ema", mode="min", save_top_k=1)
    cb = EMACallback(decay=0.9, validate_both=True)
    fit([cb, Record(), ckpt], max_epochs=4, enable_checkpointing=True)
    best_epoch = min(range(len(history)), key=history.__getitem__)
    assert float(ckpt.best_model_score) == pytest.approx(history[best_epoch])
    stored = torch.load(ckpt.best_model_path, weights_only=True)
    assert stored["epoch"] == best_epoch
    # the averaged weights in that checkpoint give the monitored value
    model = Regressor()
    model.load_state_dict(stored["state_dict"])
    cb2 = EMACallback(decay=0.9)
    cb2.on_validation_start(trainer(), model)
    assert cb2.ema is not None
    cb2.ema.load_state_dict(stored["polyak_ema"]["ema"])
    with cb2.ema.apply():
        assert manual_val_loss(model) == pytest.approx(history[best_epoch], rel=1e-6)
    # a fresh Trainer testing from that checkpoint restores the EMA state and tests the averaged weights
    (result,) = trainer(callbacks=[EMACallback(decay=0.9), ckpt], enable_checkpointing=True).test(
        Regressor(), DataLoader(VAL, batch_size=8), ckpt_path=ckpt.best_model_path, verbose=False
    )
    assert result["test_loss"] == pytest.approx(history[best_epoch], rel=1e-6)


def test_update_bn_recomputes_statistics_of_the_average_before_validation() -> None:
    cb = EMACallback(decay=0.8, update_bn=2, buffers="copy")
    model, t = fit([cb], max_epochs=1)
    assert cb.ema is not None
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with cb.ema.apply():
        plain = manual_val_loss(model)
        update_bn(loaders()[0], model, num_batches=2)
        recomputed = manual_val_loss(model)
    assert abs(plain - recomputed) > 1e-6
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(recomputed, rel=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k  # the live statistics are back


def test_save_averaged_at_end_and_argument_errors() -> None:
    cb = EMACallback(decay=0.8, save_averaged_at_end=True)
    model, _ = fit([cb], max_epochs=1)
    assert cb.ema is not None
    averaged = cb.ema.averaged_state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, averaged[k]), k
    with pytest.raises(ValueError, match="update_bn must be"):
        EMACallback(update_bn=0)
    with pytest.raises(ValueError, match="eval_start_step must be"):
        EMACallback(eval_start_step=-1)


class LazyRegressor(Regressor):
    """Lightning's documented ``configure_model`` pattern: the layers are created there (as under
    ``ModelParallelStrategy``, where ``fully_shard`` replaces every parameter there), after the callbacks'
    ``setup`` hook has run."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr = 0.05
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def test_the_ema_is_built_after_configure_model() -> None:
    """Fails on the callback that built the EMA in ``setup``: the module had no parameters yet."""
    eager_cb, lazy_cb = EMACallback(decay=0.8), EMACallback(decay=0.8)
    fit([eager_cb], max_epochs=1)
    lazy = LazyRegressor()
    t = trainer(callbacks=[lazy_cb], max_epochs=1)
    t.fit(lazy, *loaders())
    assert eager_cb.ema is not None
    assert lazy_cb.ema is not None
    assert lazy_cb.ema.step == eager_cb.ema.step == 8
    want, got = eager_cb.ema.averaged_state_dict(), lazy_cb.ema.averaged_state_dict()
    assert sorted(want) == sorted(got)
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
    (result,) = t.test(lazy, DataLoader(VAL, batch_size=8), verbose=False)
    with lazy_cb.ema.apply():
        assert result["test_loss"] == pytest.approx(manual_val_loss(lazy), rel=1e-6)
