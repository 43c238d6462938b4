"""``polyak.load`` is all or nothing: a section that does not fit changes none of the three objects.

Each case here loaded part of a checkpoint before failing (EMA and model overwritten, optimizer
half-loaded), or failed on a file polyak itself wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import polyak

from .conftest import make_model


def _step(model: nn.Module, opt: torch.optim.Optimizer, ema: polyak.EMA, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = model(torch.randn(16, 4, generator=gen)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update()


def _trained(opt_cls: Any, **opt_kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer, polyak.EMA]:
    model = make_model(0)
    opt = opt_cls(model.parameters(), **opt_kwargs)
    ema = polyak.EMA(model, decay=0.9)
    for i in range(3):
        _step(model, opt, ema, i)
    return model, opt, ema


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, ema: polyak.EMA) -> dict[str, Any]:
    opt_state = opt.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": ema.state_dict(),
        "opt_groups": [dict(g) for g in opt_state["param_groups"]],
        "opt_state": {
            p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in opt_state["state"].items()
        },
        "opt_type": type(opt.state[next(iter(opt.state))]) if opt.state else None,
    }


def _assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, ema: polyak.EMA, before: dict[str, Any]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before["model"][k]), k
    now = ema.state_dict()
    assert now["step"] == before["ema"]["step"]
    for k, v in now["averages"][0].items():
        assert torch.equal(v, before["ema"]["averages"][0][k]), k
    state = opt.state_dict()
    assert state["param_groups"] == before["opt_groups"]
    assert sorted(state["state"]) == sorted(before["opt_state"])
    for p, entry in before["opt_state"].items():
        assert sorted(state["state"][p]) == sorted(entry)
        for k, v in entry.items():
            assert torch.equal(state["state"][p][k], v) if isinstance(v, torch.Tensor) else state["state"][p][k] == v


def _target() -> tuple[nn.Module, torch.optim.Optimizer, polyak.EMA]:
    return _trained(torch.optim.AdamW, lr=1e-3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sgd_checkpoint_into_adamw_changes_nothing(tmp_path: Path, suffix: str) -> None:
    model, opt, ema = _trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    path = polyak.save(tmp_path / f"sgd{suffix}", ema, model=model, optimizer=opt)
    m2, o2, e2 = _target()
    before = _snapshot(m2, o2, e2)
    with pytest.raises(ValueError, match="another kind of optimizer"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_crafted_optimizer_state_changes_nothing(tmp_path: Path, suffix: str) -> None:
    """Same optimizer class, but a parameter's state lacks 'step': Adam's __setstate__ raises KeyError
    after the new state was bound; the check loads it into a copy first."""
    model, opt, ema = _target()
    crafted = opt.state_dict()
    crafted["state"] = {p: dict(s) for p, s in crafted["state"].items()}
    del crafted["state"][0]["step"]
    path = polyak.save(tmp_path / f"c{suffix}", ema, model=model, optimizer=crafted)
    m2, o2, e2 = _target()
    before = _snapshot(m2, o2, e2)
    with pytest.raises(ValueError, match="AdamW refuses the saved optimizer state"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)


def test_optimizer_state_for_an_unknown_parameter_changes_nothing(tmp_path: Path) -> None:
    model, opt, ema = _target()
    crafted = opt.state_dict()
    crafted["state"] = {**crafted["state"], 99: crafted["state"][0]}
    path = polyak.save(tmp_path / "c.pt", ema, model=model, optimizer=crafted)
    m2, o2, e2 = _target()
    before = _snapshot(m2, o2, e2)
    with pytest.raises(ValueError, match="entry 99 names no parameter"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)


def test_sparse_model_tensor_changes_nothing(tmp_path: Path) -> None:
    model, opt, ema = _target()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].to_sparse()
    path = polyak.save(tmp_path / "s.pt", ema, model=state, optimizer=opt)
    m2, o2, e2 = _target()
    before = _snapshot(m2, o2, e2)
    with pytest.raises(ValueError, match="sparse"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)


def test_ema_mismatch_is_refused_before_the_optimizer_and_model(tmp_path: Path) -> None:
    model, opt, ema = _target()
    path = polyak.save(tmp_path / "c.safetensors", ema, model=model, optimizer=opt)
    m2, o2, _ = _target()
    e2 = polyak.EMA(m2, decay=[0.9, 0.5])  # two averages: the saved state has one
    before = _snapshot(m2, o2, e2)
    with pytest.raises(ValueError, match="holds 1 average"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)


class _WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.info: dict[str, Any] = {"vocab": ["a", "b"], "scale": 0.5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def get_extra_state(self) -> dict[str, Any]:
        return dict(self.info)

    def set_extra_state(self, state: Any) -> None:
        self.info = dict(state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_model_with_non_tensor_extra_state_round_trips(tmp_path: Path, suffix: str) -> None:
    model = _WithExtraState()
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    path = polyak.save(tmp_path / f"x{suffix}", ema, model=model)
    other = _WithExtraState()
    other.info = {"vocab": [], "scale": 1.0}
    polyak.load(path, polyak.EMA(other, decay=0.9), model=other)
    assert other.info == {"vocab": ["a", "b"], "scale": 0.5}
    assert torch.equal(other.lin.weight, model.lin.weight)


def test_pt_format_under_a_safetensors_name_reads_back(tmp_path: Path) -> None:
    """torch.load dispatches on a '.safetensors' suffix; polyak reads from its own open handle."""
    model = make_model(0)
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    path = polyak.save(tmp_path / "odd.safetensors", ema, model=model, format="pt")
    other = make_model(1)
    e2 = polyak.EMA(other, decay=0.9)
    polyak.load(path, e2, model=other)
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(e2.averaged_state_dict()[k], v), k


@pytest.mark.parametrize("failing", ["pre_hook", "post_hook"])
def test_model_load_code_failing_after_the_checks_changes_nothing(tmp_path: Path, failing: str) -> None:
    """Every check passes; then the model's own load code raises while it is being written (a load
    hook here; set_extra_state or a custom _load_from_state_dict alike). The EMA and the optimizer were
    already written: load puts all three back before it raises."""
    model, opt, ema = _trained(torch.optim.AdamW, lr=1e-3)
    path = polyak.save(tmp_path / "ok.safetensors", ema, model=model, optimizer=opt)
    m2, o2, e2 = _trained(torch.optim.AdamW, lr=1e-3)
    for i in range(3, 6):  # a different state than the file's, so a half-done load would show
        _step(m2, o2, e2, i)
    before = _snapshot(m2, o2, e2)

    def refuse(*_: Any, **__: Any) -> None:
        raise RuntimeError("this module refuses to load")

    last = list(m2.modules())[-1]
    if failing == "pre_hook":
        last._register_load_state_dict_pre_hook(refuse)
    else:
        last.register_load_state_dict_post_hook(refuse)
    with pytest.raises(ValueError, match="the model's own load code failed .*left as they were"):
        polyak.load(path, e2, model=m2, optimizer=o2)
    _assert_unchanged(m2, o2, e2, before)
