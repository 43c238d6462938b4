"""What the Lightning and Hugging Face callbacks share: EMA's default decay, index and warm-up argument
checks, the swap of averaged weights, and public names only."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

import polyak.integrations  # noqa: E402
from polyak import EMA  # noqa: E402
from polyak.integrations import lightning as pl_cb  # noqa: E402
from polyak.integrations import transformers as hf_cb  # noqa: E402
from polyak.integrations._callback import AveragedSwap  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)


def build_lightning(cb: Any) -> EMA:
    module = Tiny()
    cb.on_fit_start(SimpleNamespace(global_step=0), module)
    assert cb.ema is not None
    return cb.ema


def build_hf(cb: Any, tmp_path: Path) -> EMA:
    cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0), None, model=Tiny())
    assert cb.ema is not None
    return cb.ema


def test_both_callbacks_default_to_emas_own_decay(tmp_path: Path) -> None:
    """The HF callback used 0.999 while EMA and the Lightning callback use 0.9999."""
    reference = EMA(Tiny())
    for ema in (build_lightning(pl_cb.EMACallback()), build_hf(hf_cb.EMACallback(), tmp_path)):
        assert ema.num_averages == reference.num_averages
        for t in (1, 10, 10_000):
            assert ema.decays_at(t) == reference.decays_at(t)
    for cb in (pl_cb.EMACallback, hf_cb.EMACallback):
        assert inspect.signature(cb).parameters["decay"].default is None  # no second copy of the number


def test_index_and_warmup_arguments_checked_alike(tmp_path: Path) -> None:
    for cb in (pl_cb.EMACallback, hf_cb.EMACallback):
        with pytest.raises(TypeError, match="index must be an int"):
            cb(index=True)
        with pytest.raises(TypeError, match="index must be an int"):
            cb(index=1.0)
        with pytest.raises(ValueError, match="eval_start_step must be >= 0"):
            cb(eval_start_step=-1)
        assert cb(eval_start_step=np.int64(3)).eval_start_step == 3
    # the index is checked against the number of averages when the EMA is built, numpy ints accepted
    assert build_lightning(pl_cb.EMACallback(decay=[0.5, 0.9], index=np.int64(-1))).num_averages == 2
    assert build_hf(hf_cb.EMACallback(decay=[0.5, 0.9], index=np.int32(1)), tmp_path).num_averages == 2
    with pytest.raises(ValueError, match=r"index 2 out of range: this EMA keeps 2 average\(s\)"):
        build_lightning(pl_cb.EMACallback(decay=[0.5, 0.9], index=2))
    with pytest.raises(ValueError, match=r"index -3 out of range"):
        build_hf(hf_cb.EMACallback(decay=[0.5, 0.9], index=-3), tmp_path)


def test_averaged_swap_is_idempotent_and_restores_the_live_weights() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    live = model.weight.detach().clone()
    averaged = ema.averaged_state_dict()["weight"]
    swap = AveragedSwap()
    swap.swap_out()  # nothing in: a no-op
    swap.swap_in(ema, 0)
    swap.swap_in(ema, 0)  # already in: a no-op, not a second nested swap
    assert swap.active
    assert torch.equal(model.weight, averaged)
    swap.swap_out()
    assert not swap.active
    assert torch.equal(model.weight, live)
    swap.swap_out()
    assert torch.equal(model.weight, live)


ALLOWED = {"polyak._validate", "polyak.integrations._callback"}


def _private_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polyak"):
            module = node.module or ""
            for alias in node.names:
                private = any(p.startswith("_") for p in module.split(".")) or alias.name.startswith("_")
                if private and module not in ALLOWED:
                    found.append(f"from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("polyak") and "._" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner.endswith("ema") or owner.startswith("polyak"):
                found.append(f"{owner}.{node.attr}")
    return found


def test_integrations_use_only_public_polyak_names() -> None:
    """No ``ema._check_index``, no ``polyak.io._checkpoint``; the argument checks (``polyak._validate``)
    and the integrations' own shared module are the allowed private imports."""
    folder = Path(polyak.integrations.__file__).parent
    for path in sorted(folder.glob("*.py")):
        assert _private_uses(path.read_text()) == [], path.name
