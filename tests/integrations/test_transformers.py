"""EMACallback on a real transformers.Trainer (CPU, a tiny BERT built from a config, no download)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from polyak import EMA  # noqa: E402
from polyak.integrations.transformers import (  # noqa: E402
    EMA_STATE_FILE,
    EMACallback,
    load_ema_state,
    save_ema_state,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning"),
]


def tiny_model() -> Any:
    config = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


TRAIN, EVAL = Data(32, 1), Data(16, 2)


def make_trainer(tmp_path: Path, callbacks: list, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 3,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    args = transformers.TrainingArguments(**kwargs)
    return transformers.Trainer(
        model=tiny_model(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=callbacks
    )


class Record(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self.metrics.append(dict(metrics))


def test_scheduled_evaluation_uses_the_averaged_weights(tmp_path: Path) -> None:
    cb, record = EMACallback(decay=0.7), Record()
    trainer = make_trainer(tmp_path, [cb, record])
    trainer.train()
    assert cb.ema is not None
    assert cb.ema.step == 6
    logged = record.metrics[-1]["eval_loss"]
    raw = trainer.evaluate()["eval_loss"]
    with cb.ema.apply():
        averaged = trainer.evaluate()["eval_loss"]
    assert raw != pytest.approx(averaged, rel=1e-4)
    assert logged == pytest.approx(averaged, rel=1e-6)
    # and each checkpoint holds the EMA state next to the live weights
    for step in (3, 6):
        assert (tmp_path / f"checkpoint-{step}" / EMA_STATE_FILE).is_file()
    restored = EMA(tiny_model(), decay=0.7)
    load_ema_state(restored, tmp_path / "checkpoint-6" / EMA_STATE_FILE)
    assert restored.step == 6
    for k, v in cb.ema.averaged_state_dict().items():
        assert torch.equal(v, restored.averaged_state_dict()[k]), k


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    full_cb = EMACallback(decay=0.7)
    full = make_trainer(tmp_path / "full", [full_cb])
    full.train()
    part_cb = EMACallback(decay=0.7)
    make_trainer(tmp_path / "part", [part_cb], max_steps=6).train()
    resumed_cb = EMACallback(decay=0.7)
    resumed = make_trainer(tmp_path / "part", [resumed_cb])
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert full_cb.ema is not None
    assert resumed_cb.ema is not None
    assert resumed_cb.ema.step == full_cb.ema.step == 6
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    want, got = full_cb.ema.averaged_state_dict(), resumed_cb.ema.averaged_state_dict()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    cb = EMACallback(decay=0.7)
    make_trainer(tmp_path, [cb], max_steps=3, gradient_accumulation_steps=2, eval_strategy="no").train()
    assert cb.ema is not None
    assert cb.ema.step == 3


def test_disabled_is_bit_identical_and_save_averaged_at_end(tmp_path: Path) -> None:
    plain = make_trainer(tmp_path / "plain", [])
    plain.train()
    off_cb = EMACallback(decay=0.7, enabled=False)
    off = make_trainer(tmp_path / "off", [off_cb])
    off.train()
    assert off_cb.ema is None
    assert not (tmp_path / "off" / "checkpoint-3" / EMA_STATE_FILE).exists()
    for (k, a), b in zip(plain.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.equal(a, b), k
    end_cb = EMACallback(decay=0.7, save_averaged_at_end=True)
    on = make_trainer(tmp_path / "on", [end_cb])
    on.train()
    assert end_cb.ema is not None
    averaged = end_cb.ema.averaged_state_dict()
    assert any(not torch.equal(v, averaged[k]) for k, v in plain.model.state_dict().items())
    on.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, averaged[k]), k


def test_state_file_round_trip_and_errors(tmp_path: Path) -> None:
    model = tiny_model()
    ema = EMA(model, decay=[0.5, 0.9])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    save_ema_state(ema, tmp_path / "s.safetensors")
    other = EMA(tiny_model(), decay=[0.5, 0.9])
    load_ema_state(other, tmp_path / "s.safetensors")
    assert other.step == 1
    for i in (0, 1):
        for k, v in ema.averaged_state_dict(i).items():
            assert torch.equal(v, other.averaged_state_dict(i)[k]), k
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a polyak EMA state file"):
        load_ema_state(other, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="eval_start_step must be"):
        EMACallback(eval_start_step=-2)


def test_epoch_evaluation_uses_the_average(tmp_path: Path) -> None:
    cb, record = EMACallback(decay=0.7), Record()
    trainer = make_trainer(
        tmp_path, [cb, record], max_steps=-1, num_train_epochs=2, eval_strategy="epoch", save_strategy="no"
    )
    trainer.train()
    assert cb.ema is not None
    assert cb.ema.step == 16
    assert len(record.metrics) == 2
    with cb.ema.apply():
        averaged = trainer.evaluate()["eval_loss"]
    assert record.metrics[1]["eval_loss"] == pytest.approx(averaged, rel=1e-6)


def test_cold_average_is_not_evaluated(tmp_path: Path) -> None:
    cb, record = EMACallback(decay=0.7, eval_start_step=10**6), Record()
    trainer = make_trainer(tmp_path, [cb, record], max_steps=3, save_strategy="no")
    trainer.train()
    assert record.metrics[-1]["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
