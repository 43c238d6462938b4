"""Hugging Face ``transformers.Trainer``: ``EMACallback`` keeps a ``polyak.EMA`` of the model, updates it
after every optimizer step, evaluates on the averaged weights, saves it in every checkpoint (safetensors)
and restores it on ``trainer.train(resume_from_checkpoint=...)``.

Needs ``pip install 'polyak[hf]'``. transformers is imported when this module is imported, never by
``import polyak``.

How it fits the Trainer's loop (transformers 4.x/5.x callback events):

- ``on_train_begin`` builds the EMA from the model (after the Trainer has loaded a checkpoint's weights)
  and, when ``state.global_step > 0`` (a resume), loads ``polyak_ema.safetensors`` from
  ``<output_dir>/checkpoint-<global_step>``;
- ``on_step_end`` runs once per *optimizer* step (micro-batches of gradient accumulation fire
  ``on_substep_end``), so the average counts optimizer steps; when the flow has asked for an evaluation
  at this step (or epoch) it swaps the averaged weights in, so the ``eval_*`` metrics of every eval
  dataset -- and ``metric_for_best_model`` / ``load_best_model_at_end`` -- are those of the averaged
  weights;
- the live weights come back before anything reads or writes the model's state: a
  ``state_dict``/``load_state_dict`` pre-hook on the model (the Trainer's checkpoint save and best-model
  load go through them), ``on_step_begin``, ``on_epoch_begin``, ``on_save`` and ``on_train_end``. So
  checkpoints hold the live weights plus the EMA state, and with a dict of eval datasets all of them are
  evaluated on the averaged weights (the Trainer fires ``on_evaluate`` after each one, with no event
  between the last one and the checkpoint save: the hook is what catches that save);
- ``on_save`` writes the EMA state next to the Trainer's checkpoint files.

Sharded models (FSDP2 through accelerate): the Trainer shards the model before ``on_train_begin``, so the
EMA averages each rank's local shards with no collective. The Trainer fires every event on every rank;
the events that communicate are the evaluation on the averaged weights (the model's own forward gathers
them), ``on_save`` (``polyak.save`` gathers one tensor at a time and rank 0 writes one standard file;
the ranks follow rank 0's view of the checkpoint directory) and, with ``swap_at_end``, nothing more
(each rank copies its own averaged shards). On resume every rank reads the file and takes its part.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import polyak.io
from polyak.ema import EMA, DecayLike
from polyak.integrations._callback import (
    AveragedSwap,
    build_ema,
    check_index,
    check_start,
    is_sharded,
    is_warm,
    rank0_says,
    wait_for_all,
)

__all__ = ["CHECKPOINT_FILE", "EMACallback", "load_ema_state", "save_ema_state"]

log = logging.getLogger("polyak")

CHECKPOINT_FILE = "polyak_ema.safetensors"


def save_ema_state(ema: EMA, path: str | os.PathLike[str]) -> None:
    """Write ``ema`` to ``path`` as a polyak safetensors checkpoint (``polyak.save``: atomic, fsynced,
    with a sha256 of the tensor bytes; ``polyak inspect`` reads it). For an EMA of a sharded model (FSDP2)
    this is a collective that every rank must call; rank 0 writes the one file."""
    polyak.io.save(path, ema, format="safetensors")


def load_ema_state(ema: EMA, path: str | os.PathLike[str]) -> None:
    """Restore a file written by :func:`save_ema_state` into ``ema`` (validated before anything changes;
    no pickle). An EMA of a sharded model takes each rank's part of the full tensors: every rank reads the
    file."""
    checkpoint = polyak.io.read(path)
    if checkpoint.kind != "polyak" or checkpoint.ema is None:
        raise ValueError(
            f"{os.fspath(path)!r} is not a polyak EMA checkpoint (it holds {checkpoint.kind!r} data); "
            "pass a file written by EMACallback or polyak.save(path, ema)"
        )
    ema.load_state_dict(checkpoint.ema)


class EMACallback(TrainerCallback):  # type: ignore[misc]
    """Exponential moving average of a ``transformers`` model for ``Trainer``, evaluated and checkpointed.

    The average is ``polyak.EMA``: ``shadow <- beta_t shadow + (1 - beta_t) weight`` after each optimizer
    step, matched by parameter name; the model is never deep-copied.

    Args:
        decay, **ema_kwargs: passed to ``polyak.EMA`` (a float, a schedule, or a list of them); ``decay=None``
            (default) is ``polyak.EMA``'s default decay.
        enabled: ``False`` makes every hook a no-op (training identical to no callback), for ablations.
        evaluate_averaged: evaluate on the averaged weights (``index``) instead of the live ones.
        eval_start_step: before this optimizer step, evaluation runs on the live weights (a cold average).
        index: which average to evaluate/save when ``decay`` is a list.
        save_state: write ``polyak_ema.safetensors`` into every checkpoint directory.
        swap_at_end: at the end of training, copy the averaged weights into the model, so that a following
            ``trainer.save_model()`` / ``push_to_hub`` saves them. With ``load_best_model_at_end`` the EMA
            of the best checkpoint is loaded first.
    """

    def __init__(
        self,
        decay: DecayLike | Sequence[DecayLike] | None = None,
        *,
        enabled: bool = True,
        evaluate_averaged: bool = True,
        eval_start_step: int = 0,
        index: int = 0,
        save_state: bool = True,
        swap_at_end: bool = False,
        **ema_kwargs: Any,
    ) -> None:
        eval_start_step = check_start(eval_start_step, "eval_start_step")
        index = check_index(index)
        self.decay = decay
        self.enabled = bool(enabled)
        self.evaluate_averaged = bool(evaluate_averaged)
        self.eval_start_step = eval_start_step
        self.index = index
        self.save_state = bool(save_state)
        self.swap_at_end = bool(swap_at_end)
        self.ema_kwargs = ema_kwargs
        self.ema: EMA | None = None
        self._swap = AveragedSwap()
        self._handles: list[Any] = []  # the model's state_dict / load_state_dict pre-hooks (see _swap_out)

    # --- helpers -------------------------------------------------------------------------------------------
    def _build(self, model: nn.Module) -> EMA:
        if self.ema is None:
            self.ema = build_ema(model, self.decay, self.index, **self.ema_kwargs)
        return self.ema

    def _swap_in(self, state: TrainerState) -> None:
        if self.ema is None or not self.evaluate_averaged:
            return
        if is_warm(self.ema, state.global_step, self.eval_start_step):
            self._swap.swap_in(self.ema, self.index)

    def _swap_out(self, *_: Any, **__: Any) -> None:
        """Put the live weights back (a no-op when they are in). Also the model's state_dict and
        load_state_dict pre-hook, so nothing saves or loads the model while the average is swapped in."""
        self._swap.swap_out()

    def _hook(self, model: nn.Module) -> None:
        self._unhook()
        self._handles = [
            model.register_state_dict_pre_hook(self._swap_out),  # type: ignore[no-untyped-call]
            model.register_load_state_dict_pre_hook(self._swap_out),  # type: ignore[no-untyped-call]
        ]

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def save_averaged(self, trainer: Any, output_dir: str | None = None) -> None:
        """``trainer.save_model(output_dir)`` with the averaged weights swapped in (the live model is
        restored afterwards)."""
        if self.ema is None:
            raise ValueError("save_averaged: the EMA does not exist yet; call it after trainer.train()")
        with self.ema.apply(self.index):
            trainer.save_model(output_dir)

    # --- Trainer events ------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.enabled:
            return
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError("EMACallback: the Trainer passed no model to on_train_begin")
        ema = self._build(model)
        self._hook(model)
        if state.global_step > 0:
            path = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}", CHECKPOINT_FILE)
            if os.path.isfile(path):
                load_ema_state(ema, path)
                log.info("polyak: EMA state restored from %s (EMA step %d)", path, ema.step)
            else:
                raise ValueError(
                    f"EMACallback: resuming at step {state.global_step} but {path!r} does not exist; resume "
                    "from a checkpoint written with EMACallback(save_state=True) in args.output_dir, or start "
                    "a fresh average with a new callback and global_step 0"
                )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.enabled or self.ema is None:
            return
        self.ema.update()
        if control.should_evaluate:
            self._swap_in(state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.enabled and control.should_evaluate:
            self._swap_in(state)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._swap_out()  # train on the live weights

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._swap_out()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the EMA state next to the checkpoint. A sharded EMA (FSDP2, or ``shard=True``) is saved by
        every rank together (``polyak.save`` gathers one tensor at a time and rank 0 writes) once the ranks
        agree on rank 0's view of the directory, and every rank returns after the file is written; a
        replicated EMA is written by the process that saves the checkpoint (``args.should_save``)."""
        self._swap_out()  # never checkpoint averaged weights as the live ones
        if not self.enabled or not self.save_state or self.ema is None:
            return
        ema_state = self.ema.state_dict()
        sharded = is_sharded(ema_state)
        if not sharded and not getattr(args, "should_save", True):
            return
        directory = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        exists = os.path.isdir(directory)
        if sharded:  # no rank may skip the gathers that rank 0 waits in
            exists = rank0_says(exists)
        if not exists:
            log.warning("polyak: checkpoint directory %s not found; EMA state not saved", directory)
            return
        polyak.io.save(os.path.join(directory, CHECKPOINT_FILE), ema_state, format="safetensors")
        if sharded:  # the other ranks leave the gathers before rank 0 has written the file
            wait_for_all()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._swap_out()
        self._unhook()
        if not self.enabled or self.ema is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            path = os.path.join(best, CHECKPOINT_FILE)
            if os.path.isfile(path):
                load_ema_state(self.ema, path)
        if self.swap_at_end:
            model = kwargs.get("model")
            if isinstance(model, nn.Module):
                self.ema.copy_to(model, self.index)
