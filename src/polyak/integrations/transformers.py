"""Hugging Face ``transformers.Trainer``: ``EMACallback`` keeps a ``polyak.EMA`` of the model, updates it
after every optimizer step, runs the Trainer's scheduled evaluations on the averaged weights, writes the
EMA state into every checkpoint directory (safetensors) and restores it on ``resume_from_checkpoint``.

Needs ``pip install 'polyak[hf]'``. transformers is imported when this module is imported, never by
``import polyak``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from polyak.ema import EMA, DecayLike

__all__ = ["EMA_STATE_FILE", "EMACallback", "load_ema_state", "save_ema_state"]

log = logging.getLogger("polyak")

EMA_STATE_FILE = "polyak_ema.safetensors"
_METADATA_KEY = "polyak_ema"


def save_ema_state(ema: EMA, path: str | os.PathLike[str]) -> None:
    """Write ``ema.state_dict()`` as one safetensors file: tensors ``averages.<k>.<key>``, everything else as
    JSON in the file's metadata. Loading it executes no code (unlike a pickle)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {
        f"averages.{k}.{key}": value.detach().contiguous().cpu()
        for k, average in enumerate(state["averages"])
        for key, value in average.items()
    }
    meta = {key: value for key, value in state.items() if key != "averages"}
    meta["num_averages"] = len(state["averages"])
    tmp = Path(f"{os.fspath(path)}.tmp")
    save_file(tensors, os.fspath(tmp), metadata={_METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written state behind


def load_ema_state(ema: EMA, path: str | os.PathLike[str]) -> None:
    """Restore a file written by :func:`save_ema_state` into ``ema`` (validated by ``EMA.load_state_dict``)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{os.fspath(path)!r} is not a polyak EMA state file (no {_METADATA_KEY!r} metadata)")
        meta = json.loads(metadata[_METADATA_KEY])
        averages: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta.pop("num_averages")))]
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            _, k, key = name.split(".", 2)
            averages[int(k)][key] = f.get_tensor(name)
    device_state = {**meta, "averages": averages}
    ema.load_state_dict(device_state)


class EMACallback(TrainerCallback):  # type: ignore[misc]
    """Exponential moving average of the model trained by ``transformers.Trainer``.

    The average is ``polyak.EMA`` (``shadow <- beta_t shadow + (1 - beta_t) weight``), updated in
    ``on_step_end``, i.e. once per optimizer step (gradient accumulation counts optimizer steps).

    - Evaluation: when the Trainer is about to evaluate (``control.should_evaluate`` after a step or an
      epoch), the averaged weights are swapped into the model; ``on_evaluate`` swaps the live weights back
      before any checkpoint is written. The logged ``eval_*`` metrics, and so ``metric_for_best_model``,
      are those of the averaged weights. ``eval_start_step`` evaluates the live weights until then.
      A ``trainer.evaluate()`` you call yourself is not scheduled by the Trainer: wrap it in
      ``with callback.ema.apply():``.
    - Checkpoints: ``polyak_ema.safetensors`` (see :func:`save_ema_state`) is written into each
      ``checkpoint-<step>`` directory; the checkpoint's model weights stay the live ones.
    - Resume: on ``trainer.train(resume_from_checkpoint=...)`` the state is read back from
      ``args.resume_from_checkpoint`` or ``<output_dir>/checkpoint-<global_step>``.
    - ``save_averaged_at_end=True`` copies the averaged weights into the model when training ends, so
      ``trainer.save_model()`` writes the averaged model.
    - ``enabled=False`` does nothing (ablation); training is bit-identical to no callback.

    Args:
        decay: as ``polyak.EMA``; ``index`` picks the average used for evaluation and saving.
        **ema_kwargs: passed to ``polyak.EMA`` (``start_step``, ``update_every``, ``include``, ...).
    """

    def __init__(
        self,
        decay: DecayLike | Sequence[DecayLike] = 0.9999,
        *,
        index: int = 0,
        eval_start_step: int = 0,
        save_averaged_at_end: bool = False,
        enabled: bool = True,
        **ema_kwargs: Any,
    ) -> None:
        if isinstance(eval_start_step, bool) or not isinstance(eval_start_step, int) or eval_start_step < 0:
            raise ValueError(f"eval_start_step must be an int >= 0, got {eval_start_step!r}")
        self.decay = decay
        self.index = index
        self.eval_start_step = eval_start_step
        self.save_averaged_at_end = bool(save_averaged_at_end)
        self.enabled = bool(enabled)
        self.ema_kwargs = ema_kwargs
        self.ema: EMA | None = None
        self._swap = ExitStack()

    # --- building, resuming, updating ------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.enabled:
            return
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError("EMACallback needs the model in on_train_begin; use it with transformers.Trainer")
        if self.ema is None or self.ema.model is not model:
            self.ema = EMA(model, decay=self.decay, **self.ema_kwargs)
            self.ema._check_index(self.index)
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(str(args.output_dir)) / f"checkpoint-{state.global_step}")
        for directory in candidates:
            path = directory / EMA_STATE_FILE
            if path.is_file() and self.ema is not None:
                load_ema_state(self.ema, path)
                return
        log.warning(
            "polyak: resuming at step %d but no %s found in %s; the average restarts from the loaded weights",
            state.global_step,
            EMA_STATE_FILE,
            [str(c) for c in candidates],
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ema is None:
            return
        self.ema.update()
        self._maybe_swap_in(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_swap_in(state, control)

    # --- evaluation ------------------------------------------------------------------------------------
    def _maybe_swap_in(self, state: TrainerState, control: TrainerControl) -> None:
        if self.ema is None or not control.should_evaluate or self.ema._applied:
            return
        if self.ema.step == 0 or state.global_step < self.eval_start_step:
            return
        self._swap.enter_context(self.ema.apply(index=self.index))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._swap.close()

    # --- saving ----------------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ema is None:
            return
        self._swap.close()  # never save the averaged weights as the live ones
        directory = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not directory.is_dir():
            log.warning("polyak: checkpoint directory %s not found; EMA state not saved", directory)
            return
        if state.is_world_process_zero:
            save_ema_state(self.ema, directory / EMA_STATE_FILE)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ema is None:
            return
        self._swap.close()
        if self.save_averaged_at_end:
            self.ema.copy_to(self.ema.model, index=self.index)
