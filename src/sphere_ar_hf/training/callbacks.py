"""The callbacks a :class:`~.trainer.SphereARTrainer` adds to itself: crash-safe checkpoints
(:class:`CheckpointCompletionCallback`), the dataset's epoch (:class:`DatasetEpochCallback`) and the startup
summary (:class:`StartupSummaryCallback`). They act through the Trainer's public ``on_*`` events only."""

from __future__ import annotations

import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from .checkpoints import checkpoints_to_delete, mark_checkpoint_complete

__all__ = ["GENERATOR_STATE_NAME", "CheckpointCompletionCallback", "DatasetEpochCallback", "StartupSummaryCallback"]

logger = logging.getLogger(__name__)

GENERATOR_STATE_NAME = "loss_generator_{}.safetensors"


class DatasetEpochCallback(TrainerCallback):
    """Calls ``train_dataset.set_epoch(epoch)`` at the start of every epoch (augmentation / posterior draws)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class CheckpointCompletionCallback(TrainerCallback):
    """Makes the checkpoints of a :class:`~.trainer.SphereARTrainer` crash-safe, from the Trainer's public
    ``on_*`` events.

    * before a step that saves (``on_step_end`` / ``on_epoch_end`` with ``should_save``): removes a
      ``checkpoint-<step>`` folder an earlier, killed run left, so that no file of it survives in the new one;
    * ``on_train_begin``: restores this process's loss generator from the checkpoint the run resumes from;
    * ``on_save`` (after the Trainer wrote the checkpoint and earlier callbacks, e.g. the EMA, added theirs):
      writes this process's loss-generator state, calls the trainer's ``on_checkpoint_written``, waits for
      every process, writes the completion marker, then keeps the newest ``save_total_limit`` complete
      checkpoints (and the best one) and deletes incomplete ones. The trainer must be its last callback.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.written: set[int] = set()  # steps whose checkpoint this run wrote

    def _folder(self, state: TrainerState) -> Path:
        return Path(self.trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def _clear_stale(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        may_save = control.should_save or (args.save_strategy == SaveStrategy.BEST and control.should_evaluate)
        if not may_save or state.global_step in self.written:
            return
        folder = self._folder(state)
        if args.should_save and folder.exists():
            logger.info("removing %s, left by an earlier run, before writing it again", folder)
            shutil.rmtree(folder)
        self.trainer.accelerator.wait_for_everyone()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._clear_stale(args, state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._clear_stale(args, state, control)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs) -> None:
        folder = self.trainer.resumed_from
        if folder is None:
            return
        path = Path(folder) / GENERATOR_STATE_NAME.format(args.process_index)
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                self.trainer.generator.set_state(f.get_tensor("state"))
        else:
            logger.warning("%s has no loss-generator state for process %d: the noise stream restarts",
                           folder, args.process_index)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        folder = self._folder(state)
        self.written.add(state.global_step)
        folder.mkdir(parents=True, exist_ok=True)
        if not args.save_only_model:
            save_file({"state": self.trainer.generator.get_state().cpu()},
                      str(folder / GENERATOR_STATE_NAME.format(args.process_index)))
        self.trainer.on_checkpoint_written(folder)
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            mark_checkpoint_complete(folder, state.global_step)
            self._rotate(folder.parent, state)
        self.trainer.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: Path, state: TrainerState) -> None:
        """Keep the newest ``save_total_limit`` complete checkpoints, every ``keep_checkpoints_every``-th and the
        best one; drop incomplete ones (:func:`~.checkpoints.checkpoints_to_delete`)."""
        limit, every = self.trainer.save_total_limit, self.trainer.keep_checkpoints_every
        for p in checkpoints_to_delete(run_dir, limit, every, protect=[state.best_model_checkpoint]):
            logger.info("deleting checkpoint %s (save_total_limit=%d)", p, limit)
            shutil.rmtree(p, ignore_errors=True)


class StartupSummaryCallback(TrainerCallback):
    """Prints :meth:`~.trainer.SphereARTrainer.startup_summary` once, on the main process, when training starts."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs) -> None:
        if state.is_world_process_zero:
            print(self.trainer.startup_summary(state, kwargs.get("train_dataloader")), file=sys.stderr, flush=True)
