"""Is this update finite, and what the ``nonfinite`` policy does about one that is not.

``verdict`` is the one finiteness check of an update, before any shadow is written: ``True`` (fine, or
``nonfinite="ignore"``), a 0-dim bool flag on the counters' device that the host never reads during
``update()`` (counters on the device: the lerp is masked by it, ``polyak._counters`` counts it), or the
keys of the non-finite tensors (checked on the host: nothing is written). ``refuse`` applies the
policy to refusals (optax's ``apply_if_finite`` counts them the same way): ``"skip"`` logs them and
returns how many to add to ``skipped_updates``, ``"raise"`` raises a ValueError naming the tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from polyak import _kernels, _sharding
from polyak._counters import refusal_message
from polyak._layout import Group
from polyak._placement import Whole

__all__ = ["refuse", "verdict"]

log = logging.getLogger("polyak")


def verdict(
    groups: Sequence[Group],
    sources: Sequence[Tensor | None],
    nonfinite: str,
    flag_device: torch.device | None,
    storage: Whole,
) -> bool | Tensor | list[str]:
    """The finiteness verdict of one update over every group's ``sources`` (``None``: per tensor).

    ``flag_device``: where the device counters live (None: checked on the host). ``storage.replicas``: the
    whole live tensors of a rank-split EMA, which every rank checks (the same verdict, no collective);
    ``storage.agrees``: one all-reduce of the verdict over the ranks (DTensor shards under ``"skip"``)."""
    if nonfinite == "ignore" or not groups:
        return True
    replicas, agree = storage.replicas, storage.agrees(nonfinite)
    if replicas:  # replicated weights: every rank checks all of them, the same verdict
        live = [[replicas.get(k, src) for k, src in zip(g.keys, g.sources)] for g in groups]
        if flag_device is not None:
            return torch.stack([_kernels.all_finite(t).to(flag_device) for t in live]).all()
        fine = [_kernels.finite_on_host(t) for t in live]
        if all(fine):
            return True
        return [g.keys[i] for g, t, f in zip(groups, live, fine) if not f for i in _kernels.nonfinite_indices(t)]
    if flag_device is not None:
        flags = [
            _kernels.all_finite(g.sources) if src is None else _kernels.flat_finite(src)
            for g, src in zip(groups, sources)
        ]
        flag = torch.stack([f.to(flag_device, non_blocking=True) for f in flags]).all()
        return _sharding.agree(flag, flag_device) if agree else flag
    fine = [_kernels.finite_on_host(g.sources if src is None else [src]) for g, src in zip(groups, sources)]
    ok = all(fine)
    if agree:  # every rank makes the one all-reduce
        ok = bool(_sharding.agree(ok, torch.device("cpu")))
    if ok:
        return True
    bad = [g.keys[i] for g, f in zip(groups, fine) if not f for i in _kernels.nonfinite_indices(g.sources)]
    return bad or ["(a shard on another rank)"]


def refuse(nonfinite: str, bad: list[str] | None, step: int, count: int = 1) -> int:
    """Apply the policy to ``count`` refused updates (the last at ``step``; ``bad`` names the tensors, None
    when checked on the device): log them and return ``count`` (``"skip"``), or raise (``"raise"``)."""
    at, where = refusal_message(bad, step, count)
    if nonfinite == "skip":
        log.warning("polyak: skipped EMA update at %s: NaN/inf %s", at, where)
        return count
    raise ValueError(
        f"non-finite values (NaN or inf) {where} at {at}; the average was left unchanged. Fix the "
        "divergence (lower the learning rate, clip gradients) or build the EMA with nonfinite='skip' "
        "to skip such updates."
    )
