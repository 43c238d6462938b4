"""The snapshot directory of a post-hoc EMA run: a manifest and one polyak checkpoint per snapshot.

Layout of ``DIR``::

    manifest.safetensors            run id, gammas, update_every, snapshot_every, dtype, keys and shapes,
                                    and the steps of the snapshots that belong to the run
    snapshot-000000001000.safetensors   ``polyak.save`` of the EMA after step 1000 (every gamma), with
                                    the run id and the step in its ``extra``

Every file is written atomically and checksummed by ``polyak.save``. Only the snapshots listed in the
manifest are read, and each must carry the manifest's run id, step, gammas, keys, shapes and dtype, so a
stale file (an earlier run, a run resumed from an older checkpoint) or a foreign one is refused by name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polyak import _state
from polyak._progress import Progress
from polyak._validate import as_float, as_int
from polyak.posthoc import _math

__all__ = ["MANIFEST_NAME", "Manifest", "Snapshots", "Synthesis", "read_manifest", "snapshot_name"]

MANIFEST_NAME = "manifest.safetensors"
FORMAT = "polyak.posthoc"
VERSION = 1


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:012d}.safetensors"


@dataclass(frozen=True)
class Manifest:
    """What a post-hoc run stores: checked against every snapshot before it is used."""

    run_id: str
    gammas: tuple[float, ...]
    update_every: int
    snapshot_every: int
    dtype: str
    keys: tuple[tuple[str, tuple[int, ...]], ...]
    steps: tuple[int, ...] = ()

    def to_extra(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "run_id": self.run_id,
            "gammas": list(self.gammas),
            "update_every": self.update_every,
            "snapshot_every": self.snapshot_every,
            "dtype": self.dtype,
            "keys": [[key, list(shape)] for key, shape in self.keys],
            "steps": list(self.steps),
        }

    @classmethod
    def from_extra(cls, extra: Any, name: str) -> Manifest:
        if not isinstance(extra, Mapping) or extra.get("format") != FORMAT:
            raise ValueError(f"{name!r} is not a post-hoc EMA manifest (written by polyak.PostHocEMA)")
        version = extra.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ValueError(
                f"{name!r}: manifest version {version!r} is not one this polyak reads (<= {VERSION}); upgrade"
            )
        try:
            return cls(
                run_id=str(extra["run_id"]),
                gammas=tuple(float(g) for g in extra["gammas"]),
                update_every=int(extra["update_every"]),
                snapshot_every=int(extra["snapshot_every"]),
                dtype=str(extra["dtype"]),
                keys=tuple((str(k), tuple(int(d) for d in shape)) for k, shape in extra["keys"]),
                steps=tuple(int(s) for s in extra["steps"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{name!r} is a corrupt post-hoc EMA manifest ({exc!r})") from None


def read_manifest(directory: str | os.PathLike[str]) -> Manifest | None:
    """The manifest in ``directory``, or None if it has none."""
    from polyak.io import read

    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    return Manifest.from_extra(read(path).extra, str(path))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    from polyak.io import save

    save(directory / MANIFEST_NAME, extra=manifest.to_extra())


def snapshot_extra(manifest: Manifest, step: int) -> dict[str, Any]:
    return {"posthoc": {"run_id": manifest.run_id, "step": step, "gammas": list(manifest.gammas)}}


def read_snapshot(directory: Path, manifest: Manifest, step: int) -> list[dict[str, Tensor]]:
    """The averages (one per gamma) stored at ``step``, after checking the file belongs to the run."""
    from polyak.io import read

    path = directory / snapshot_name(step)
    name = str(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r} is listed in the manifest of {str(directory)!r} but missing; restore it or start a new run"
        )
    ckpt = read(path)
    info = ckpt.extra.get("posthoc") if isinstance(ckpt.extra, Mapping) else None
    if ckpt.kind != "polyak" or not isinstance(info, Mapping) or not isinstance(ckpt.ema, Mapping):
        raise ValueError(f"{name!r} is not a post-hoc EMA snapshot (written by polyak.PostHocEMA)")
    if info.get("run_id") != manifest.run_id:
        raise ValueError(
            f"{name!r} belongs to another run (run id {info.get('run_id')!r}, the manifest says "
            f"{manifest.run_id!r}): a stale file from an earlier run; delete it or use a fresh directory"
        )
    state = _state.parse(ckpt.ema, what=name)  # the one reader of the EMA state format
    if info.get("step") != step or state.step != step:
        raise ValueError(
            f"{name!r} holds step {state.step!r} (labelled {info.get('step')!r}), not step {step}; "
            "the file was renamed or is corrupt"
        )
    if [float(g) for g in info.get("gammas", [])] != list(manifest.gammas):
        raise ValueError(f"{name!r} holds gammas {info.get('gammas')!r}, the manifest {list(manifest.gammas)!r}")
    averages = state.averages
    if len(averages) != len(manifest.gammas):
        raise ValueError(f"{name!r} holds {len(averages)} averages, the manifest {len(manifest.gammas)}")
    want = dict(manifest.keys)
    for avg in averages:
        have = {k: tuple(v.shape) for k, v in avg.items()}
        if have != want:
            diff = sorted(set(have) ^ set(want)) or [k for k in want if have[k] != want[k]]
            raise ValueError(f"{name!r}: keys or shapes differ from the manifest (e.g. {diff[:5]})")
        dtypes = {str(v.dtype) for v in avg.values()}
        if dtypes - {manifest.dtype}:
            raise ValueError(f"{name!r} holds dtypes {sorted(dtypes)}, the manifest says {manifest.dtype}")
    return [dict(avg) for avg in averages]


@dataclass(frozen=True)
class Synthesis:
    """How an average of width ``sigma_rel`` at step ``at`` is made from the snapshots: ``coefficients[i]``
    multiplies the average of exponent ``gammas[i]`` stored at ``steps[i]`` (they sum to 1). ``error`` is
    the relative L2 distance between the profile they give and the exact power-function profile;
    ``gain = sum |c|`` is how much the stored values' rounding can be amplified."""

    sigma_rel: float
    gamma: float
    at: int
    steps: tuple[int, ...]
    gammas: tuple[float, ...]
    coefficients: tuple[float, ...]
    error: float
    gain: float


class Snapshots:
    """A post-hoc EMA run's snapshot directory, read-only: ``weights()`` and ``synthesize()``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no such directory: {str(self.directory)!r}")
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ValueError(
                f"{str(self.directory)!r} holds no {MANIFEST_NAME}: it is not a polyak.PostHocEMA snapshot directory"
            )
        self.manifest = manifest

    @property
    def steps(self) -> tuple[int, ...]:
        return self.manifest.steps

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        return tuple(_math.gamma_to_sigma_rel(g) for g in self.manifest.gammas)

    def _at(self, at: int | None) -> int:
        if not self.steps:
            raise ValueError(f"{str(self.directory)!r} holds no snapshot yet; train past the first snapshot step")
        if at is None:
            return self.steps[-1]
        at = as_int(at, "at", minimum=1)
        if at not in self.steps:
            before = [s for s in self.steps if s < at][-1:]
            after = [s for s in self.steps if s > at][:1]
            raise ValueError(
                f"at={at} is not a snapshot step (nearest: {before + after}); the average at a step between "
                "snapshots is not determined by them: pass one of the snapshot steps"
            )
        return at

    def weights(self, sigma_rel: float, at: int | None = None) -> Synthesis:
        """The least-squares coefficients for width ``sigma_rel`` at snapshot step ``at`` (default: the
        last), over every snapshot up to ``at``, and the relative error of the profile they give."""
        sigma = as_float(sigma_rel, "sigma_rel")
        gamma = _math.sigma_rel_to_gamma(sigma)
        at = self._at(at)
        k = self.manifest.update_every
        steps = [s for s in self.steps if s <= at for _ in self.manifest.gammas]
        gammas = [g for s in self.steps if s <= at for g in self.manifest.gammas]
        sol = _math.solve([(s // k, g) for s, g in zip(steps, gammas)], (at // k, gamma))
        return Synthesis(sigma, gamma, at, tuple(steps), tuple(gammas), sol.coefficients, sol.error, sol.gain)

    def synthesize(self, sigma_rel: float, at: int | None = None) -> dict[str, Tensor]:
        """The averaged tensors of width ``sigma_rel`` at step ``at``: ``sum_i c_i * snapshot_i``, summed in
        float64 and returned in the snapshots' dtype, keyed like ``EMA.state_dict()['averages']``."""
        return self.combine(self.weights(sigma_rel, at))

    def combine(self, synthesis: Synthesis, *, progress: bool = False) -> dict[str, Tensor]:
        """``sum_i c_i * snapshot_i`` for the coefficients of ``synthesis`` (float64 sum). With ``progress``,
        a progress line on stderr while the snapshot files are read (only on a terminal, after 1 s)."""
        total: dict[str, Tensor] | None = None
        per_step: dict[int, list[float]] = {}
        for step, c in zip(synthesis.steps, synthesis.coefficients):
            per_step.setdefault(step, []).append(c)
        used = {step: coeffs for step, coeffs in per_step.items() if any(c != 0.0 for c in coeffs)}
        with Progress(len(used), "reading snapshots", quiet=not progress) as bar:
            for step, coeffs in used.items():
                averages = read_snapshot(self.directory, self.manifest, step)
                if total is None:
                    total = {key: torch.zeros(tuple(v.shape), dtype=torch.float64) for key, v in averages[0].items()}
                for c, avg in zip(coeffs, averages):
                    if c != 0.0:
                        for key, value in avg.items():
                            total[key].add_(value.to(torch.float64), alpha=c)
                bar.advance()
        if total is None:  # the coefficients sum to 1, so one is nonzero
            raise RuntimeError("internal error: every synthesis coefficient is zero")
        dtype = getattr(torch, self.manifest.dtype.removeprefix("torch."))
        return {key: value.to(dtype) for key, value in total.items()}


def check_sigma_rels(sigma_rels: Sequence[float]) -> tuple[float, ...]:
    """Validated exponents for ``sigma_rels`` (at least one, all distinct)."""
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
        raise TypeError(f"sigma_rels must be a sequence of floats such as (0.05, 0.10), got {sigma_rels!r}")
    if not sigma_rels:
        raise ValueError("sigma_rels is empty; pass at least one width, e.g. (0.05, 0.10)")
    values = [as_float(s, f"sigma_rels[{i}]") for i, s in enumerate(sigma_rels)]
    gammas = tuple(_math.sigma_rel_to_gamma(s) for s in values)
    if len({round(g, 12) for g in gammas}) != len(gammas) or any(math.isclose(a, b) for a, b in _pairs(values)):
        raise ValueError(f"sigma_rels must be distinct, got {values}")
    return gammas


def _pairs(values: Sequence[float]) -> list[tuple[float, float]]:
    return [(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
