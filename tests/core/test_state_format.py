"""The EMA state format (``polyak._state``): every field checked before anything is written, and
impossible counters refused with the key named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import polyak
from polyak import _state


def _trained(debias: bool = False, decays: object = 0.9) -> polyak.EMA:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=decays, debias=debias)  # type: ignore[arg-type]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    return ema


def _fresh_like(ema: polyak.EMA) -> polyak.EMA:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return polyak.EMA(model, decay=list(ema.schedules), debias=ema.debias)


def _snapshot(ema: polyak.EMA) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    state = ema.state_dict()
    counters = {k: state[k] for k in ("step", "skipped_updates", "products", "last_decays")}
    return state["averages"][0], counters


def _assert_unchanged(ema: polyak.EMA, before: tuple[dict[str, torch.Tensor], dict[str, object]]) -> None:
    shadows, counters = _snapshot(ema)
    assert counters == before[1]
    for key, value in before[0].items():
        assert torch.equal(shadows[key], value), key


# --- bug: a bad counter overwrote the shadows and raised a bare int() error ------------------------------
def test_bad_counter_names_the_key_and_writes_nothing() -> None:
    saved = _trained().state_dict()
    target = _fresh_like(_trained())
    before = _snapshot(target)
    bad = dict(saved, skipped_updates="n/a")
    with pytest.raises(ValueError, match="'skipped_updates'"):
        target.load_state_dict(bad)
    _assert_unchanged(target, before)


# --- impossible counters are refused --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("products", [math.nan], r"products\[0\]"),  # NaN averages under debias
        ("products", [2.0], r"products\[0\]"),  # 1 - 2 < 0: the live weights, silently
        ("products", [-0.5], r"products\[0\]"),
        ("products", [0.5, 0.5], r"holds 1 average\(s\) but 2 'products'"),
        ("products", "1.0", "'products' must be a list of 1"),
        ("last_decays", [1.5], r"last_decays\[0\]"),
        ("last_decays", [True], r"last_decays\[0\]"),
        ("skipped_updates", -1, "'skipped_updates' must be a non-negative int"),
        ("skipped_updates", 2.5, "'skipped_updates'"),
        ("step", -3, "'step' must be a non-negative int"),
        ("step", True, "'step'"),
        ("step", None, "'step'"),
    ],
)
@pytest.mark.parametrize("debias", [False, True])
def test_impossible_counters_are_refused(field: str, value: object, named: str, debias: bool) -> None:
    saved = _trained(debias).state_dict()
    target = _fresh_like(_trained(debias))
    before = _snapshot(target)
    with pytest.raises(ValueError, match=named):
        target.load_state_dict(dict(saved, **{field: value}))
    _assert_unchanged(target, before)


def test_missing_step_is_named() -> None:
    saved = _trained().state_dict()
    del saved["step"]
    with pytest.raises(ValueError, match="'step' entry is missing"):
        _fresh_like(_trained()).load_state_dict(saved)


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda s: s["averages"][0].update({"0.weight": torch.ones(4, 3, dtype=torch.int64)}), "averages are floating"),
        (lambda s: s["averages"][0].update({"0.weight": [1.0]}), "not a tensor"),
        (lambda s: s["averages"][0].update({"0.weight": torch.eye(4, 3).to_sparse()}), "dense"),
        (lambda s: s.update(config={"debias": "yes"}), r"config\['debias'\]"),
        (lambda s: s.update(config=[1]), "'config' must be a mapping"),
        (lambda s: s.update(averages=[]), "non-empty list"),
        (lambda s: s.update(version=2), "unsupported polyak EMA state version 2"),
        (lambda s: s.update(format="other"), "not a polyak EMA state dict"),
    ],
)
def test_malformed_fields_are_refused_before_writing(mutate: object, named: str) -> None:
    saved = _trained().state_dict()
    mutate(saved)  # type: ignore[operator]
    target = _fresh_like(_trained())
    before = _snapshot(target)
    with pytest.raises(ValueError, match=named):
        target.load_state_dict(saved)
    _assert_unchanged(target, before)


def test_second_average_is_checked_before_the_first_is_written() -> None:
    """A NaN in average 1 must leave average 0 untouched too (validate all, then write)."""
    saved = _trained(decays=[0.9, 0.5]).state_dict()
    saved["averages"][1]["0.weight"] = torch.full((4, 3), math.nan)
    target = _fresh_like(_trained(decays=[0.9, 0.5]))
    before = _snapshot(target)
    with pytest.raises(ValueError, match="NaN/inf in '0.weight' \\(average 1\\)"):
        target.load_state_dict(saved)
    _assert_unchanged(target, before)


def test_state_round_trips_and_parses_typed() -> None:
    ema = _trained(debias=True, decays=[0.9, polyak.schedules.uniform()])
    state = ema.state_dict()
    parsed = _state.parse(state)
    assert parsed.step == 3
    assert parsed.num_averages == 2
    assert parsed.debias is True
    assert parsed.products == tuple(state["products"])
    other = _fresh_like(ema)
    other.load_state_dict(state)
    for k in range(2):
        a, b = ema.averaged_state_dict(k), other.averaged_state_dict(k)
        for key in a:
            if a[key].is_floating_point():
                assert torch.equal(a[key], b[key]), key


def test_debiased_closed_form_and_before_the_first_update() -> None:
    shadow = [torch.tensor([0.19, 0.38], dtype=torch.float64)]
    # after two updates of beta = 0.9 from a zero shadow towards w = (1, 2): (1 - 0.81) * w, product 0.81
    (out,) = _state.debiased(shadow, 0.81, debias=True, live=None)
    assert torch.allclose(out, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-15)
    (same,) = _state.debiased(shadow, 0.81, debias=False, live=None)
    assert same is shadow[0]
    live = [torch.tensor([5.0, 6.0])]
    (before,) = _state.debiased([torch.zeros(2, dtype=torch.float64)], 1.0, debias=True, live=live)
    assert before.dtype == torch.float64
    assert before.tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="has not been updated yet"):
        _state.debiased([torch.zeros(2)], 1.0, debias=True, live=None)


def test_check_index_is_public_and_accepts_numpy() -> None:
    np = pytest.importorskip("numpy")
    ema = _trained(decays=[0.9, 0.5, 0.1])
    assert ema.check_index(-1) == 2
    assert ema.check_index(np.int64(1)) == 1
    with pytest.raises(ValueError, match="index 3 out of range: this EMA keeps 3"):
        ema.check_index(3)
    with pytest.raises(TypeError, match="index must be an int"):
        ema.check_index(True)
