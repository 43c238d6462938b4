"""A character-level transformer on Python's own standard-library source, scored by held-out bits per
character.

Text: the source files in ``STDLIB_FILES`` of the running Python (present wherever Python is; the exact
text, hence the numbers, differ slightly between Python versions), concatenated in that order and read
as UTF-8 bytes (vocabulary of 256). The first 90% trains; of the rest, the first half is validation and
the second half test. Bits per character: mean next-byte cross-entropy over held-out windows / ln 2.

Model: a pre-norm decoder-only transformer (GPT-2 layout: learned positions, causal self-attention via
``scaled_dot_product_attention``, GELU MLP of width 4d, final LayerNorm), without dropout.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["STDLIB_FILES", "StdlibCharLM", "stdlib_text"]

STDLIB_FILES: tuple[str, ...] = ("argparse.py", "textwrap.py", "string.py", "functools.py", "fractions.py")
VOCAB = 256


@lru_cache(maxsize=1)
def stdlib_text() -> bytes:
    """The concatenated sources of ``STDLIB_FILES`` as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in STDLIB_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the stdlib-text task reads Python's standard-library sources, but {', '.join(missing)} "
            f"is missing under {root}; install the Python sources (e.g. the distribution's full python3 package)"
        )
    return b"".join((root / f).read_bytes() for f in STDLIB_FILES)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


class _CharTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))  # type: ignore[no-any-return]


class StdlibCharLM:
    """The ``stdlib-text`` task: ``hidden = (width, layers)``; random windows of ``context + 1`` bytes
    from the training text; evaluation on the first ``eval_chars`` bytes of validation and test."""

    metric = "bits per character"

    def __init__(
        self,
        seed: int,
        hidden: Sequence[int] = (64, 2),
        batch_size: int = 32,
        *,
        context: int = 64,
        heads: int = 4,
        eval_chars: int = 16384,
    ) -> None:
        if len(hidden) != 2:
            raise ValueError(f"stdlib-text: hidden must be (width, layers), got {tuple(hidden)}")
        data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
        n_train = int(0.9 * len(data))
        n_val = (len(data) - n_train) // 2
        self.train = data[:n_train]
        windows = context + 1
        self.held_out = {
            part: self._windows(text[:eval_chars], windows)
            for part, text in (("val", data[n_train : n_train + n_val]), ("test", data[n_train + n_val :]))
        }
        self.width, self.layers, self.heads = int(hidden[0]), int(hidden[1]), heads
        self.context, self.batch_size = context, batch_size

    @staticmethod
    def _windows(text: Tensor, size: int) -> Tensor:
        """Non-overlapping windows of ``size`` bytes (each predicts its last ``size - 1``)."""
        count = len(text) // size
        return text[: count * size].view(count, size)

    def model(self) -> nn.Module:
        return _CharTransformer(self.width, self.layers, self.heads, self.context)

    def batch(self, gen: torch.Generator) -> Tensor:
        starts = torch.randint(len(self.train) - self.context - 1, (self.batch_size,), generator=gen)
        return self.train[starts.unsqueeze(1) + torch.arange(self.context + 1)]

    @staticmethod
    def _nats(model: nn.Module, windows: Tensor) -> Tensor:
        logits = model(windows[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))

    def loss(self, model: nn.Module, batch: Tensor, gen: torch.Generator) -> Tensor:
        return self._nats(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, windows in self.held_out.items():
            nats = float(self._nats(model, windows))
            out[part], out[f"{part}_loss"] = nats / math.log(2), nats
        return out
