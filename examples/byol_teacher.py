"""A tiny BYOL run with ``polyak.Teacher``: self-supervised features for handwritten digits, on the CPU.

    python examples/byol_teacher.py --epochs 20

BYOL (Grill et al. 2020) trains an online network (encoder, projector, predictor) to predict, from one
augmented view of an image, the projection a momentum teacher (an EMA of the online encoder and
projector) gives for another view. Here the images are scikit-learn's bundled 8x8 digits (1,797 images,
no download); the augmentations are random shifts, pixel dropout and noise. The teacher:

    teacher = Teacher(online, momentum=schedules.dino(total_steps, base=0.99), include=["encoder", "projector"],
                      buffers="average", mode="train")
    teacher.attach(optimizer)          # one update per optimizer step, also under gradient accumulation

leaves the predictor out (``include=``), runs without gradients with batch statistics, keeps an average
of the online BatchNorm statistics for evaluation, and shares its storage with the EMA's shadows. At the end a logistic-regression probe (labels used only there) compares the features of the
teacher's encoder, the online encoder and an untrained encoder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyak import Teacher, schedules


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    return x, torch.tensor(data.target)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel, 15% pixel dropout and a little noise."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    out = padded[:, :, dy : dy + 8, dx : dx + 8]
    keep = (torch.rand(out.shape, generator=gen) > 0.15).float()
    return (out * keep + 0.05 * torch.randn(out.shape, generator=gen)).reshape(n, -1)


class Online(nn.Module):
    """encoder -> projector is what the teacher averages; the predictor is the online network's own."""

    def __init__(self, dim: int = 64, proj: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, dim))
        self.projector = nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, proj))
        self.predictor = nn.Sequential(nn.Linear(proj, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the target path (what the teacher runs)
        return self.projector(self.encoder(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self(x))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def probe_accuracy(encoder: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Logistic regression on frozen features: fit on the first 1,200 images, score on the rest."""
    from sklearn.linear_model import LogisticRegression

    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        feats = encoder(x.reshape(x.shape[0], -1)).numpy()
    encoder.train(was_training)
    clf = LogisticRegression(max_iter=2000)
    clf.fit(feats[:1200], y[:1200].numpy())
    return float(clf.score(feats[1200:], y[1200:].numpy()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_tensors()
    untrained = Online().encoder
    online = Online()
    micro = args.batch_size // args.accumulate
    steps_per_epoch = x.shape[0] // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(online.parameters(), lr=2e-3, weight_decay=1e-4)
    # BYOL's target network runs with batch statistics (mode="train"); its running statistics are an
    # average of the online network's (buffers="average"), for the probe in eval mode at the end.
    teacher = Teacher(
        online,
        momentum=schedules.dino(total_steps, base=0.99),
        include=["encoder", "projector"],
        buffers="average",
        mode="train",
    )
    teacher.attach(optimizer)

    for epoch in range(args.epochs):
        online.train()
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = x[order[step * args.batch_size : (step + 1) * args.batch_size]]
            for chunk in batch.split(micro):
                v1, v2 = augment(chunk, gen), augment(chunk, gen)
                loss = byol_loss(online.predict(v1), teacher(v2)) + byol_loss(online.predict(v2), teacher(v1))
                (loss / args.accumulate).backward()
                total += float(loss.detach()) / args.accumulate
            optimizer.step()  # the teacher updates here, once
            optimizer.zero_grad(set_to_none=True)
        print(f"epoch {epoch + 1:3d}  loss {total / steps_per_epoch:.4f}  momentum {teacher.momentum:.5f}")

    summary = {
        "teacher_updates": teacher.step,
        "optimizer_steps": total_steps,
        "probe_teacher": probe_accuracy(teacher.module.encoder, x, y),
        "probe_online": probe_accuracy(online.encoder, x, y),
        "probe_untrained": probe_accuracy(untrained, x, y),
    }
    print(
        f"linear probe accuracy: teacher {summary['probe_teacher']:.3f}, online {summary['probe_online']:.3f}, "
        f"untrained {summary['probe_untrained']:.3f} ({teacher.step} teacher updates for {total_steps} optimizer "
        f"steps of {args.accumulate} micro-batches)"
    )
    return summary


if __name__ == "__main__":
    main()
