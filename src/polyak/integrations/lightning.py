"""PyTorch Lightning: ``EMACallback`` keeps a ``polyak.EMA`` of the LightningModule, updates it after
every optimizer step, evaluates on the averaged weights and saves/resumes it with Lightning checkpoints.

Needs ``pip install 'polyak[lightning]'``. Lightning is imported when this module is imported, never by
``import polyak``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from polyak.bn import update_bn as _update_bn
from polyak.ema import EMA, DecayLike
from polyak.integrations._callback import AveragedSwap, build_ema, check_index, check_start, is_warm, one_file_state

__all__ = ["EMACallback"]

log = logging.getLogger("polyak")

CHECKPOINT_KEY = "polyak_ema"


class EMACallback(Callback):
    """Exponential moving average of a LightningModule's weights, YOLOv8-style: on by default, validation
    on the averaged weights, best checkpoint chosen on the averaged metric, both weights saved and resumed.

    The average is ``polyak.EMA`` (``shadow <- beta_t shadow + (1 - beta_t) weight`` after each optimizer
    step), held as flat name-matched shadows; the module is never deep-copied.

    What it does:

    - updates once per *optimizer* step (``trainer.global_step`` advancing), so gradient accumulation
      counts optimizer steps, not batches, and steps skipped by the AMP grad scaler are not averaged;
    - runs validation, test and predict on the averaged weights (restored afterwards, BatchNorm statistics
      included); with ``validate_both=True`` each validation batch is run on both weights and every metric
      the module logs as ``name`` is also logged as ``name_ema`` from the averaged weights, so
      ``ModelCheckpoint(monitor="val_loss_ema")`` keeps the best averaged epoch;
    - skips averaged evaluation while the average is cold (``global_step < eval_start_step`` or
      ``current_epoch < eval_start_epoch``): the live weights are evaluated and, with ``validate_both``,
      their metrics are also logged under the ``_ema`` names so that monitors always find their key;
    - stores the EMA state in every Lightning checkpoint (key ``"polyak_ema"``) and restores it on
      ``trainer.fit(ckpt_path=...)``; the checkpoint's ``state_dict`` keeps the live (raw) weights;
    - ``update_bn=True`` (or a number of batches) recomputes BatchNorm statistics of the averaged weights
      on the training data before each averaged evaluation (``polyak.update_bn``); the live statistics are
      restored afterwards;
    - ``save_averaged_at_end=True`` copies the averaged weights into the module when training ends, so
      ``trainer.save_checkpoint``/``torch.save(module.state_dict())`` afterwards store the averaged model;
    - ``enabled=False`` does nothing at all: training is bit-identical to a run without the callback;
    - sharded models (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``, or
      ``shard=True`` under DDP): the EMA is built at ``on_fit_start`` (or the validate/test/predict start),
      after ``configure_model``, so each rank averages its own part with no collective; Lightning runs every
      hook used here on every rank, as the collectives need (evaluating on the averaged weights, gathering
      the averages for a checkpoint). Lightning writes the callback state from rank 0 only, so the
      checkpoint holds the full average, gathered one tensor at a time to rank 0's CPU; on resume each rank
      takes its part.

    Compared with Lightning's own ``WeightAveraging``/``EMAWeightAveraging`` (lightning 2.6), which keep a
    deep copy (``AveragedModel``), swap parameters with the live model by position (zip order) and swap
    in only for validation: this callback also evaluates test and predict on the averaged weights, logs
    raw and averaged metrics side by side (``validate_both``), skips averaged evaluation while cold,
    keeps several decays at once (``decay=[...]``, ``index=`` picks the one evaluated), supports the
    polyak schedules/``start_step``/``update_every``/``include``/``exclude``/``debias``/NaN policies,
    recomputes BatchNorm statistics on request, keeps the raw weights as the checkpoint's
    ``state_dict`` (theirs stores the averaged ones there), makes copying the average into the model at
    the end optional (theirs always does), and has an ``enabled`` switch for ablations.

    Args:
        decay: as ``polyak.EMA``: a float, a schedule, or a list of them; ``None`` (default) is
            ``polyak.EMA``'s default decay.
        index: which average validation/test/predict use when several decays are kept.
        validate_both: validate raw and averaged weights, logging ``name`` and ``name_ema``.
        eval_start_step, eval_start_epoch: evaluate the average only from this global step / epoch on.
        update_bn: False, True (a full pass over the training loader) or a number of batches.
        save_averaged_at_end: copy the averaged weights into the module when ``fit`` ends.
        enabled: False turns the callback into a no-op (for ablations).
        **ema_kwargs: passed to ``polyak.EMA`` (``start_step``, ``update_every``, ``include``, ...).
    """

    def __init__(
        self,
        decay: DecayLike | Sequence[DecayLike] | None = None,
        *,
        index: int = 0,
        validate_both: bool = False,
        eval_start_step: int = 0,
        eval_start_epoch: int = 0,
        update_bn: bool | int = False,
        save_averaged_at_end: bool = False,
        enabled: bool = True,
        **ema_kwargs: Any,
    ) -> None:
        eval_start_step = check_start(eval_start_step, "eval_start_step")
        eval_start_epoch = check_start(eval_start_epoch, "eval_start_epoch")
        index = check_index(index)
        if not isinstance(update_bn, (bool, int)) or (not isinstance(update_bn, bool) and update_bn < 1):
            raise ValueError(f"update_bn must be a bool or a positive number of batches, got {update_bn!r}")
        self.decay = decay
        self.index = index
        self.validate_both = bool(validate_both)
        self.eval_start_step = eval_start_step
        self.eval_start_epoch = eval_start_epoch
        self.update_bn = update_bn
        self.save_averaged_at_end = bool(save_averaged_at_end)
        self.enabled = bool(enabled)
        self.ema_kwargs = ema_kwargs
        self.ema: EMA | None = None
        self._last_global_step = 0
        self._pending_state: dict[str, Any] | None = None
        self._swap = AveragedSwap()  # holds `ema.apply()` open across an evaluation epoch
        self._both_warm = False  # this validation epoch runs the averaged pass too

    # --- building and updating ---------------------------------------------------------------------------
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the EMA once the strategy has set the model up: after ``configure_model`` (where
        ``ModelParallelStrategy`` users call ``fully_shard``, which replaces every parameter by a DTensor)
        and after the move to the device. Lightning calls the callback's ``setup`` before both, so an EMA
        built there would average the unsharded parameters that sharding then discards. ``trainer.validate``
        / ``test`` / ``predict`` without ``fit`` build it at their start hook."""
        if not self.enabled or self.ema is not None:
            return
        with torch.inference_mode(False):  # test/predict hooks run in inference mode; the averages must not be
            self.ema = build_ema(pl_module, self.decay, self.index, **self.ema_kwargs)
            self._last_global_step = trainer.global_step
            if self._pending_state is not None:  # a checkpoint restored before the model was set up
                self._load(self._pending_state)
                self._pending_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)  # trainer.validate() without fit
        if self.ema is not None and self.validate_both and self.update_bn:
            log.warning("polyak: update_bn is not applied with validate_both=True (statistics are per batch pass)")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.ema is None:
            return
        if trainer.global_step > self._last_global_step:  # an optimizer step happened in this batch
            self.ema.update()
            self._last_global_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is not None and self.save_averaged_at_end:
            self.ema.copy_to(pl_module, index=self.index)

    # --- evaluation on the averaged weights ------------------------------------------------------------
    def is_warm(self, trainer: pl.Trainer) -> bool:
        """True when the average is evaluated: it has seen an update and the start step/epoch are reached."""
        return is_warm(
            self.ema, trainer.global_step, self.eval_start_step, trainer.current_epoch, self.eval_start_epoch
        )

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None or not self.is_warm(trainer):
            return
        self._swap.swap_in(self.ema, self.index)
        if self.update_bn:
            self._recompute_bn(trainer, pl_module)

    def _recompute_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            log.warning("polyak: update_bn requested but the trainer has no train dataloader; skipped")
            return
        num = None if self.update_bn is True else int(self.update_bn)
        with torch.inference_mode(False), torch.no_grad():
            _update_bn(loader, pl_module, device=pl_module.device, num_batches=num)

    def _swap_out(self) -> None:
        self._swap.swap_out()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None:
            return
        if not self.validate_both:
            self._swap_in(trainer, pl_module)
            return
        self._both_warm = self.is_warm(trainer)
        original_log = pl_module.log
        cold = not self._both_warm

        def log_both(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            original_log(name, value, *args, **kwargs)
            if cold and not name.endswith("_ema"):  # the average is not evaluated yet: report the live value
                original_log(f"{name}_ema", value, *args, **kwargs)

        pl_module.log = log_both  # type: ignore[method-assign]

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.ema is None or not self.validate_both or not self._both_warm:
            return
        args: tuple[Any, ...] = (batch, batch_idx)
        if len(trainer.num_val_batches) > 1:  # several val loaders: validation_step takes their index
            args += (dataloader_idx,)
        raw_log = type(pl_module).log.__get__(pl_module)
        with self.ema.apply(index=self.index), _renamed_log(pl_module, raw_log):
            pl_module.validation_step(*args)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_both:
            pl_module.__dict__.pop("log", None)  # back to the class's log method
            self._both_warm = False
        self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()  # never leave the averaged weights in the live model
        pl_module.__dict__.pop("log", None)

    # --- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.ema is not None:  # sharded: every rank gathers, rank 0 writes the file
            state = one_file_state(self.ema.state_dict())
            checkpoint[CHECKPOINT_KEY] = {"ema": state, "last_global_step": self._last_global_step}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.enabled:
            return
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            log.warning(
                "polyak: the checkpoint holds no EMA state (saved without EMACallback); the average restarts "
                "from the loaded weights"
            )
            return
        if self.ema is None:
            self._pending_state = state
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if self.ema is None:
            return
        self.ema.load_state_dict(state["ema"])
        self._last_global_step = int(state["last_global_step"])


@contextmanager
def _renamed_log(pl_module: pl.LightningModule, raw_log: Callable[..., None]) -> Iterator[None]:
    """Inside, ``pl_module.log(name, ...)`` logs ``name_ema`` (``log_dict`` goes through ``log`` too)."""
    previous = pl_module.__dict__.get("log")

    def log_ema(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        raw_log(name if name.endswith("_ema") else f"{name}_ema", value, *args, **kwargs)

    pl_module.log = log_ema  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is None:
            pl_module.__dict__.pop("log", None)
        else:
            pl_module.log = previous  # type: ignore[method-assign]
