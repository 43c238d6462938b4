"""The shape of the engine behind ``EMA``: imports point one way, the placement interface is uniform."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import polyak
from polyak import _placement

SRC = Path(polyak.__file__).resolve().parent
ENGINE = sorted(p for p in SRC.glob("_*.py") if p.name != "__init__.py")


def imported(path: Path) -> set[str]:
    """The polyak modules ``path`` imports, at any depth of its code (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_engine_modules_never_import_the_facade(path: Path) -> None:
    assert not {"polyak.ema", "polyak.EMA", "polyak.teacher"} & imported(path), path.name


def test_the_facade_holds_no_sharding_branch() -> None:
    """Every placement-dependent step goes through ``_placement``: ema.py names neither ``_sharding`` nor
    ``_rank_shard`` nor tests for a sharded EMA."""
    assert not {"polyak._sharding", "polyak._rank_shard"} & imported(SRC / "ema.py")
    source = (SRC / "ema.py").read_text()
    assert "_shards is not None" not in source
    assert "_rank_layouts" not in source


def test_a_plain_model_gets_the_identity_placement() -> None:
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.5)
    storage = ema._storage
    assert type(storage) is _placement.Whole
    assert ema._shards is None
    values = {"weight": torch.ones(2, 3)}
    assert storage.state_values(values) is values
    assert storage.follow(values) is values
    assert not storage.replicas
    assert not storage.agrees("skip")
    assert storage.module_refusal is None
    state: dict[str, object] = {"a": 1}
    assert storage.full(state) is state
    assert storage.localize(state) is state


@pytest.mark.parametrize(
    ("name", "value"),
    [("nonfinite", "skip"), ("debias", True), ("update_every", 2), ("start_step", 5), ("capturable", True)],
)
def test_settings_are_read_only_after_construction(name: str, value: object) -> None:
    """The engine is planned for its settings when the EMA is built: assigning one later raises instead of
    being silently ignored."""
    ema = polyak.EMA(nn.Linear(3, 2), decay=0.9)
    before = getattr(ema, name)
    with pytest.raises(AttributeError):
        setattr(ema, name, value)
    assert getattr(ema, name) == before
