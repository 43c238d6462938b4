"""Train a tiny BERT classifier with transformers.Trainer and polyak's EMACallback, on CPU in seconds.

Evaluation runs on the averaged weights, each checkpoint carries polyak_ema.safetensors, and the averaged
weights are saved as a model at the end. Run: python examples/hf_trainer_ema.py --out /tmp/hf_ema
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from polyak.integrations.transformers import EMACallback


def make_data(n: int, seed: int, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    """Token sequences; the label says whether the first token is above the vocabulary's middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, seq), generator=g)
    labels = (ids[:, 0] > 15).long()
    mask = torch.ones(seq, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="hf_ema_run")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    ema_cb = EMACallback(decay=0.9)
    training_args = transformers.TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 2),
        save_strategy="steps",
        save_steps=max(1, args.steps // 2),
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=make_data(256, 0),
        eval_dataset=make_data(128, 1),
        callbacks=[ema_cb],
    )
    trainer.train()
    if ema_cb.ema is None:
        raise RuntimeError("the callback built no EMA")
    # trainer.evaluate() outside of training runs on the live weights; swap the average in by hand
    with ema_cb.ema.apply():
        averaged = trainer.evaluate(metric_key_prefix="eval_ema")
    live = trainer.evaluate()
    ema_cb.save_averaged(trainer, os.path.join(args.out, "ema_model"))
    print(f"live eval_loss {live['eval_loss']:.4f}   averaged eval_loss {averaged['eval_ema_loss']:.4f}")
    print(f"best checkpoint (chosen on the averaged metric): {trainer.state.best_model_checkpoint}")
    print(f"averaged model saved to {os.path.join(args.out, 'ema_model')}")


if __name__ == "__main__":
    main()
