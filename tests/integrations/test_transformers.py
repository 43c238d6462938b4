"""EMACallback for transformers.Trainer, run for real on CPU with a tiny BERT built locally (no hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from polyak import EMA  # noqa: E402
from polyak.integrations.transformers import CHECKPOINT_FILE, EMACallback, load_ema_state, save_ema_state  # noqa: E402

SEQ = 8


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, SEQ), generator=g)
    labels = (ids[:, 0] > 15).long()
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


TRAIN = make_data(32, 0)
EVAL = make_data(16, 1)


def make_model() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def make_trainer(tmp: Path, callbacks: list[Any], model: Any = None, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": len(EVAL),
        "learning_rate": 5e-3,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    args = transformers.TrainingArguments(**kwargs)
    return transformers.Trainer(
        model=model if model is not None else make_model(),
        args=args,
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=callbacks,
    )


def eval_loss(model: Any) -> float:
    batch = {k: torch.stack([ex[k] for ex in EVAL]) for k in EVAL[0]}
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def eval_losses(trainer: Any) -> dict[int, float]:
    return {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted EMA run (eval + checkpoint every 2 steps) and one plain run with the same settings
    (eval every 2 steps, no checkpoints): shared by the tests below to keep this module fast."""
    root = tmp_path_factory.mktemp("hf")
    cb = EMACallback(decay=0.7)
    full = make_trainer(root / "full", [cb])
    full.train()
    plain = make_trainer(root / "plain", [], save_strategy="no")
    plain.train()
    return {"root": root, "cb": cb, "full": full, "plain": plain}


def test_logged_eval_metric_is_the_averaged_weights(runs: dict[str, Any]) -> None:
    cb, trainer = runs["cb"], runs["full"]
    assert cb.ema is not None
    assert cb.ema.step == 6
    logged = eval_losses(trainer)[6]
    averaged = make_model()
    averaged.load_state_dict(cb.ema.averaged_state_dict())
    live_loss = eval_loss(trainer.model)
    assert logged == pytest.approx(eval_loss(averaged), rel=1e-5, abs=1e-6)
    assert abs(logged - live_loss) > 1e-4  # the test can tell averaged from live


def test_callback_leaves_live_training_untouched(runs: dict[str, Any]) -> None:
    """Averaged evaluation and checkpointing swap weights in and out; the live trajectory is unchanged."""
    for (name, p), q in zip(runs["plain"].model.named_parameters(), runs["full"].model.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_holds_ema_state_and_resume_equals_uninterrupted_run(runs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    full_cb = runs["cb"]
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(runs["root"] / "full" / "checkpoint-4", ckpt)
    assert (ckpt / CHECKPOINT_FILE).is_file()
    resumed_cb = EMACallback(decay=0.7)
    resumed = make_trainer(tmp_path, [resumed_cb])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed_cb.ema is not None
    assert resumed_cb.ema.step == full_cb.ema.step == 6
    a, b = full_cb.ema.state_dict(), resumed_cb.ema.state_dict()
    assert a["products"] == b["products"]
    for key, value in a["averages"][0].items():
        assert torch.equal(value, b["averages"][0][key]), key
    for (name, p), q in zip(runs["full"].model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert eval_losses(resumed)[6] == eval_losses(runs["full"])[6]


def test_resume_without_ema_file_is_a_clear_error(runs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(runs["root"] / "full" / "checkpoint-2", ckpt)
    (ckpt / CHECKPOINT_FILE).unlink()
    with pytest.raises(ValueError, match="does not exist"):
        make_trainer(tmp_path, [EMACallback()], max_steps=4).train(resume_from_checkpoint=str(ckpt))


def test_best_checkpoint_is_chosen_on_the_averaged_metric(tmp_path: Path) -> None:
    cb = EMACallback(decay=0.9, swap_at_end=True)
    trainer = make_trainer(tmp_path, [cb], load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    logged = eval_losses(trainer)
    best_step = min(logged, key=lambda s: logged[s])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    # the best checkpoint's EMA was loaded and swapped into the model: it scores the logged best metric
    assert eval_loss(trainer.model) == pytest.approx(logged[best_step], rel=1e-5, abs=1e-6)


def test_disabled_callback_is_bit_identical_to_no_callback(runs: dict[str, Any], tmp_path: Path) -> None:
    plain = runs["plain"]
    cb = EMACallback(enabled=False)
    off = make_trainer(tmp_path, [cb], save_strategy="no")
    off.train()
    assert cb.ema is None
    for (name, p), q in zip(plain.model.named_parameters(), off.model.parameters()):
        assert torch.equal(p, q), name
    assert eval_losses(plain) == eval_losses(off)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    cb = EMACallback(decay=0.5)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=3, gradient_accumulation_steps=2, eval_strategy="no", save_strategy="no"
    )
    trainer.train()
    assert cb.ema is not None
    assert trainer.state.global_step == 3
    assert cb.ema.step == 3


def test_eval_start_step_keeps_live_weights_while_cold(runs: dict[str, Any], tmp_path: Path) -> None:
    cold = make_trainer(tmp_path, [EMACallback(decay=0.7, eval_start_step=4)], save_strategy="no")
    cold.train()
    live, averaged, b = eval_losses(runs["plain"]), eval_losses(runs["full"]), eval_losses(cold)
    assert b[2] == live[2]  # step 2 < 4: live weights
    assert b[4] == averaged[4]  # from step 4: averaged weights
    assert b[4] != live[4]


def test_save_averaged_writes_the_averaged_weights(runs: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cb, trainer = runs["cb"], runs["full"]
    assert cb.ema is not None
    live_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    cb.save_averaged(trainer, str(tmp_path / "ema_model"))
    saved = load_file(str(tmp_path / "ema_model" / "model.safetensors"))
    expected = cb.ema.averaged_state_dict()
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, live_before[key]), key


def test_state_file_round_trip_and_foreign_file(tmp_path: Path) -> None:
    model = make_model()
    ema = EMA(model, decay=[0.9, 0.99])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    save_ema_state(ema, tmp_path / "e.safetensors")
    other = EMA(make_model(), decay=[0.9, 0.99])
    load_ema_state(other, tmp_path / "e.safetensors")
    assert other.step == 1
    for k in range(2):
        for key, value in ema.averaged_state_dict(k).items():
            assert torch.equal(value, other.averaged_state_dict(k)[key])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a polyak EMA checkpoint"):
        load_ema_state(other, tmp_path / "f.safetensors")


def test_example_script_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_ema.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "averaged eval_loss" in result.stdout
    assert (tmp_path / "checkpoint-4" / CHECKPOINT_FILE).is_file()
    assert (tmp_path / "ema_model" / "model.safetensors").is_file()


def test_epoch_evaluation_runs_on_the_averaged_weights(tmp_path: Path) -> None:
    cb = EMACallback(decay=0.7)
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, num_train_epochs=1, eval_strategy="epoch", save_strategy="no")
    trainer.train_dataset = TRAIN[:8]
    trainer.train()
    assert cb.ema is not None
    assert cb.ema.step == 2
    averaged = make_model()
    averaged.load_state_dict(cb.ema.averaged_state_dict())
    assert eval_losses(trainer)[2] == pytest.approx(eval_loss(averaged), rel=1e-5, abs=1e-6)
    assert eval_losses(trainer)[2] != pytest.approx(eval_loss(trainer.model), rel=1e-5, abs=1e-6)


def _eval_loss_on(model: Any, data: list[dict[str, torch.Tensor]]) -> float:
    batch = {k: torch.stack([ex[k] for ex in data]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_every_eval_dataset_of_a_dict_is_evaluated_on_the_averaged_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    other = make_data(16, 2)
    cb = EMACallback(decay=0.7)
    trainer = make_trainer(tmp_path, [cb])
    trainer.eval_dataset = {"a": EVAL, "b": other}
    trainer.train()
    assert cb.ema is not None
    logs = [entry for entry in trainer.state.log_history if entry.get("step") == 6]
    logged = {k: v for entry in logs for k, v in entry.items() if k in ("eval_a_loss", "eval_b_loss")}
    averaged = make_model()
    averaged.load_state_dict(cb.ema.averaged_state_dict())
    assert logged["eval_a_loss"] == pytest.approx(_eval_loss_on(averaged, EVAL), rel=1e-5, abs=1e-6)
    assert logged["eval_b_loss"] == pytest.approx(_eval_loss_on(averaged, other), rel=1e-5, abs=1e-6)
    assert abs(logged["eval_b_loss"] - _eval_loss_on(trainer.model, other)) > 1e-4  # live differs
    # the checkpoint written right after the last evaluation holds the live weights, not the average
    saved = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    live = trainer.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(value, live[key]), key
    assert not trainer.model._state_dict_pre_hooks  # the callback's hooks are gone after training
