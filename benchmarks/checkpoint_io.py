"""Checkpoint save/load time: polyak.save/load (atomic, fsync'd, checksummed, validated) against a bare
``torch.save`` + ``fsync`` and a bare ``torch.load(weights_only=True)`` of the same EMA + model state.

Run: ``.venv/bin/python benchmarks/checkpoint_io.py`` (prints seconds, best of 3, and ratios).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak


def best(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_save_synced(obj: object, path: str) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])  # 25.2M parameters, 100 MB in fp32
    ema = polyak.EMA(model, decay=0.999)
    folder = tempfile.mkdtemp()
    st, pt, ref = (os.path.join(folder, n) for n in ("a.safetensors", "a.pt", "ref.pt"))
    n_params = sum(p.numel() for p in model.parameters())
    save_ref = best(lambda: torch_save_synced({"ema": ema.state_dict(), "model": model.state_dict()}, ref))
    save_st = best(lambda: polyak.save(st, ema, model=model))
    save_pt = best(lambda: polyak.save(pt, ema, model=model))
    load_ref = best(lambda: torch.load(ref, weights_only=True))
    load_st = best(lambda: polyak.load(st, ema, model=model))
    load_pt = best(lambda: polyak.load(pt, ema, model=model))
    print(f"{n_params:,} parameters; EMA + model = {os.path.getsize(st) / 2**20:.1f} MiB")
    print(
        f"save  torch.save+fsync {save_ref:.2f}s | polyak safetensors {save_st:.2f}s ({save_st / save_ref:.1f}x) | polyak pt {save_pt:.2f}s ({save_pt / save_ref:.1f}x)"
    )
    print(
        f"load  torch.load       {load_ref:.2f}s | polyak safetensors {load_st:.2f}s ({load_st / load_ref:.1f}x) | polyak pt {load_pt:.2f}s ({load_pt / load_ref:.1f}x)"
    )
    print("(polyak's load also verifies sha256, checks keys/shapes/dtypes/finiteness and copies into EMA and model)")


if __name__ == "__main__":
    main()
