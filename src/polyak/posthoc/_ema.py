"""``PostHocEMA``: keep power-function EMAs during training, snapshot them, choose the width afterwards.

Karras et al. 2024 (EDM2, section 3.1): two power-function EMAs (``sigma_rel`` 0.05 and 0.10 by default)
are stored every ``snapshot_every`` steps; after training, the EMA of any width is synthesised as the
least-squares combination of the stored profiles (``polyak.posthoc._math.solve``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyak._validate import as_bool, as_int
from polyak.ema import EMA
from polyak.posthoc._snapshots import (
    Manifest,
    Snapshots,
    Synthesis,
    check_sigma_rels,
    read_manifest,
    snapshot_extra,
    snapshot_name,
    write_manifest,
)
from polyak.schedules import power_function

__all__ = ["PostHocEMA"]

log = logging.getLogger("polyak")
STATE_FORMAT = "polyak.posthoc.state"


class PostHocEMA:
    """Power-function EMAs of several widths, snapshotted to ``directory`` for post-hoc synthesis.

    ``update()`` folds the model into one ``EMA(decay=[power_function(gamma_i), ...],
    update_every=update_every)``; after every ``snapshot_every`` steps it writes the averages (a
    ``polyak.save`` checkpoint, in ``dtype``) and lists the step in the directory's manifest. A snapshot
    labelled t holds exactly the average of steps 1..t. ``synthesize(sigma_rel)`` returns the EMA of
    any width from the snapshots; ``weights(sigma_rel)`` says how well that width is reached.

    Args:
        model: the live model (never copied).
        sigma_rels: widths of the stored EMAs (EDM2's ``sigma_rel``: the profile's standard deviation
            over its length); each becomes ``gamma = sigma_rel_to_gamma(sigma_rel)``.
        snapshot_every: steps between snapshots; a multiple of ``update_every``.
        directory: where snapshots go; created if missing. A directory that already holds another run's
            manifest is refused (pass ``resume=True`` and call ``load_state_dict`` to continue it).
        update_every: average every k-th step (the decay of the k steps multiplied: the profile is the
            power function of the update count).
        dtype: dtype of the averages and snapshots (float32 by default).
        include, exclude, buffers: which tensors are averaged, as in ``polyak.EMA``.
        resume: continue the run stored in ``directory``: ``load_state_dict`` must come before ``update``.

    With several processes (DDP), build it on one rank only: every rank would write the same files.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int,
        directory: str | os.PathLike[str],
        update_every: int = 1,
        dtype: torch.dtype = torch.float32,
        include: Any = None,
        exclude: Any = None,
        buffers: Any = "average",
        resume: bool = False,
    ) -> None:
        gammas = check_sigma_rels(sigma_rels)
        self.update_every = as_int(update_every, "update_every", minimum=1)
        self.snapshot_every = as_int(snapshot_every, "snapshot_every", minimum=1)
        if self.snapshot_every % self.update_every:
            raise ValueError(
                f"snapshot_every={self.snapshot_every} is not a multiple of update_every={self.update_every}: a "
                "snapshot between averaging updates would be labelled with a step its average does not hold; "
                f"use e.g. snapshot_every={self.snapshot_every - self.snapshot_every % self.update_every or self.update_every}"
            )
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
        resume = as_bool(resume, "resume")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"directory={str(self.directory)!r} exists and is not a directory")
        self.ema = EMA(
            model,
            decay=[power_function(g) for g in gammas],
            update_every=self.update_every,
            include=include,
            exclude=exclude,
            buffers=buffers,
            dtype=dtype,
        )
        keys = tuple((k, tuple(v.shape)) for k, v in self.ema.state_dict()["averages"][0].items())
        fresh = Manifest(uuid.uuid4().hex, gammas, self.update_every, self.snapshot_every, str(dtype), keys)
        existing = read_manifest(self.directory) if self.directory.is_dir() else None
        if existing is not None and not resume:
            raise ValueError(
                f"{str(self.directory)!r} already holds the snapshots of run {existing.run_id} "
                f"({len(existing.steps)} snapshot(s), last at step {existing.steps[-1] if existing.steps else '-'}); "
                "pass a new directory, delete this one, or continue that run with resume=True and load_state_dict()"
            )
        if existing is not None:
            _check_compatible(existing, fresh, str(self.directory))
        self._manifest = existing or fresh
        self._awaiting_state = resume
        self.directory.mkdir(parents=True, exist_ok=True)

    # --- training -------------------------------------------------------------------------------------
    @property
    def gammas(self) -> tuple[float, ...]:
        return self._manifest.gammas

    @property
    def step(self) -> int:
        return self.ema.step

    def update(self) -> None:
        """Fold the current weights into every average; snapshot when the step is a multiple of
        ``snapshot_every``. Call after ``optimizer.step()``."""
        if self._awaiting_state:
            raise RuntimeError(
                "PostHocEMA(resume=True): call load_state_dict(...) with the checkpointed state before update()"
            )
        self.ema.update()
        if self.ema.step % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self) -> Path:
        """Write the averages of the current step now (``update()`` does this every ``snapshot_every``
        steps; call it at the end of training for a last one). The step must be an averaging step."""
        step = self.ema.step
        if step == 0 or step % self.update_every:
            raise ValueError(
                f"cannot snapshot at step {step}: the averages were last updated at step "
                f"{step - step % self.update_every} (update_every={self.update_every}); snapshot at a multiple of it"
            )
        path = self.directory / snapshot_name(step)
        if step in self._manifest.steps:
            return path
        if self._manifest.steps and step < self._manifest.steps[-1]:
            raise ValueError(f"step {step} is before the last snapshot ({self._manifest.steps[-1]})")
        from polyak.io import save

        save(path, self.ema, extra=snapshot_extra(self._manifest, step))
        manifest = Manifest(**{**self._manifest.__dict__, "steps": (*self._manifest.steps, step)})
        write_manifest(self.directory, manifest)
        self._manifest = manifest
        return path

    # --- after training -------------------------------------------------------------------------------
    def snapshots(self) -> Snapshots:
        """The snapshot directory, read back from disk."""
        return Snapshots(self.directory)

    def weights(self, sigma_rel: float, at: int | None = None) -> Synthesis:
        """Coefficients and relative profile error for width ``sigma_rel`` at snapshot step ``at``."""
        return self.snapshots().weights(sigma_rel, at)

    def synthesize(self, sigma_rel: float, at: int | None = None) -> dict[str, Tensor]:
        """The averaged tensors of width ``sigma_rel`` at snapshot step ``at`` (default: the last)."""
        return self.snapshots().synthesize(sigma_rel, at)

    @torch.no_grad()
    def copy_to(self, model: nn.Module, sigma_rel: float, at: int | None = None) -> None:
        """Write the synthesised average into ``model`` (same architecture). Every key and shape is
        checked before anything is written; tensors that are not averaged keep their values."""
        from polyak._select import normalize_key

        if not isinstance(model, nn.Module):
            raise TypeError(f"copy_to expects a torch.nn.Module, got {type(model).__name__}")
        averaged = self.synthesize(sigma_rel, at)
        targets = {normalize_key(k): v for k, v in model.state_dict(keep_vars=True).items()}
        missing = sorted(set(averaged) - set(targets))
        if missing:
            raise ValueError(f"copy_to: the model has no tensors {missing[:10]}; pass a model of the same architecture")
        for key, value in averaged.items():
            if tuple(targets[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"copy_to: shape mismatch for {key!r}: averaged {tuple(value.shape)}, model {tuple(targets[key].shape)}"
                )
        for key, value in averaged.items():
            targets[key].copy_(value)

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: the run id and the EMA state (``polyak.save(path, posthoc)`` works)."""
        return {"format": STATE_FORMAT, "version": 1, "run_id": self._manifest.run_id, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``. Snapshots listed after the restored step belong to the abandoned
        continuation: they are dropped from the manifest (and overwritten when the run reaches them)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("load_state_dict expects the output of PostHocEMA.state_dict()")
        run_id = state.get("run_id")
        on_disk = read_manifest(self.directory)
        if on_disk is not None and on_disk.run_id != run_id:
            raise ValueError(
                f"this state belongs to run {run_id!r}, but {str(self.directory)!r} holds run {on_disk.run_id!r}; "
                "pass the directory of the run that was checkpointed"
            )
        ema_state = state.get("ema")
        if not isinstance(ema_state, Mapping) or ema_state.get("config", {}).get("decay") != [
            repr(power_function(g)) for g in self.gammas
        ]:
            raise ValueError("the state's EMA has other widths than this PostHocEMA; build it with the same sigma_rels")
        self.ema.load_state_dict(ema_state)  # validates everything before changing anything
        step = self.ema.step
        base = on_disk or self._manifest
        kept = tuple(s for s in base.steps if s <= step)
        if len(kept) < len(base.steps):
            log.info(
                "post-hoc EMA: dropping %d snapshot(s) after the restored step %d", len(base.steps) - len(kept), step
            )
        self._manifest = Manifest(**{**base.__dict__, "run_id": str(run_id), "steps": kept})
        if on_disk is not None and kept != on_disk.steps:
            write_manifest(self.directory, self._manifest)
        self._awaiting_state = False

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(gammas={[round(g, 4) for g in self.gammas]}, step={self.step}, "
            f"snapshot_every={self.snapshot_every}, update_every={self.update_every}, "
            f"directory={str(self.directory)!r}, snapshots={len(self._manifest.steps)})"
        )


def _check_compatible(existing: Manifest, fresh: Manifest, name: str) -> None:
    for field in ("gammas", "update_every", "snapshot_every", "dtype", "keys"):
        if getattr(existing, field) != getattr(fresh, field):
            raise ValueError(
                f"{name!r} holds a run with {field}={getattr(existing, field)!r}, this PostHocEMA has "
                f"{getattr(fresh, field)!r}; build it as the run was built, or use a new directory"
            )
