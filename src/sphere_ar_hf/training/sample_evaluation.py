"""See quality while the AR model trains: sample with the EMA weights every N steps and log the Fréchet distance.

:class:`SampleEvaluationCallback` (added by :class:`~.trainer.SphereARTrainer` when ``eval_images > 0``) samples,
every ``eval_steps`` optimizer steps and at the last step, ``eval_images`` images of fixed labels and seeds (image
``n`` gets label and generator from ``(eval_seed, n)`` as ``sphere-ar sample --labels balanced`` draws them) with
the EMA weights (the raw weights without EMA), split across the ranks like ``sphere-ar sample`` (rank ``r`` samples
images ``r, r + world, ...``), and rank 0 computes the metrics (:class:`~.evaluation_log.ImageMetric`) and logs them:
to the Trainer's loggers (``eval/frechet_distance`` or ``eval/fid``, ...: TensorBoard), the grid to TensorBoard,
and both to ``<output_dir>/eval/`` (:class:`~.evaluation_log.EvaluationLog`). A resumed run continues the curve:
records after the checkpoint it resumes from are dropped and evaluated again. Each evaluation prints its cost.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..evaluation.sampling import image_labels, sample_images
from ..seeding import image_seeds
from .evaluation_log import EvaluationLog, ImageMetric, image_grid

__all__ = ["SampleEvaluationCallback", "SampleEvaluationSettings"]


@dataclass(frozen=True)
class SampleEvaluationSettings:
    """What an evaluation samples and how it is measured (recorded with every result)."""

    every: int
    num_images: int
    features: str = "inception"
    reference: str | None = None
    guidance_scale: float | None = None
    num_inference_steps: int = 100
    cfg_schedule: str = "linear"
    seed: int = 0
    batch_size: int = 32
    inception_weights: str | None = None

    @classmethod
    def from_training_args(cls, args: TrainingArguments) -> SampleEvaluationSettings | None:
        """The settings of ``args`` (``eval_images``, ``eval_steps``, ``eval_*``), or ``None`` when off."""
        images = int(getattr(args, "eval_images", 0) or 0)
        if images == 0:
            return None
        if images < 2:
            raise ValueError(f"--eval_images: must be 0 (off) or at least 2 (a covariance needs 2), got {images}")
        every = args.eval_steps
        if every is None or every <= 0 or (every >= 1 and every != int(every)):
            raise ValueError(f"--eval_images {images} needs --eval_steps N (evaluate every N optimizer steps), got "
                             f"{every}")
        return cls(every=every, num_images=images, features=args.eval_features, reference=args.eval_reference,
                   guidance_scale=args.eval_guidance_scale, num_inference_steps=args.eval_num_inference_steps,
                   seed=args.eval_seed, batch_size=args.per_device_eval_batch_size,
                   inception_weights=args.eval_inception_weights)


class SampleEvaluationCallback(TrainerCallback):
    """Samples and measures every ``settings.every`` steps (a float < 1: a ratio of the run's steps)."""

    def __init__(self, trainer: Any, settings: SampleEvaluationSettings):
        self.trainer, self.settings = trainer, settings
        device = str(trainer.args.device) if trainer.args.device.type == "cuda" else "cpu"
        self.metric = ImageMetric(settings.features, settings.reference, settings.inception_weights, device)
        self.log = EvaluationLog(Path(trainer.args.output_dir) / "eval")
        self.last_step = -1

    def interval(self, state: TrainerState) -> int:
        every = self.settings.every
        return max(1, round(every * state.max_steps)) if every < 1 else int(every)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.is_world_process_zero:
            self.log.keep_until(state.global_step)
        self.last_step = state.global_step  # evaluated before the checkpoint was written, or step 0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        step = state.global_step
        if step != self.last_step and (step % self.interval(state) == 0 or step == state.max_steps):
            self.evaluate(state)

    def evaluate(self, state: TrainerState) -> dict[str, Any] | None:
        """Sample with the EMA weights on every rank, gather, measure and log on rank 0 (returns its record)."""
        trainer, s = self.trainer, self.settings
        t0 = time.perf_counter()
        accelerator = trainer.accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        indices = np.arange(rank, s.num_images, world)
        model = accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        ema = trainer.ema_callback.ema if trainer.ema_callback is not None else None
        was_training = model.training
        model.eval()
        try:
            with ema.averaged_weights() if ema is not None else contextlib.nullcontext(), torch.no_grad():
                images = self.sample(indices, model.device)
        finally:
            model.train(was_training)
        if world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(indices, images)])
            indices = np.concatenate([p[0] for p in parts])
            images = np.concatenate([p[1] for p in parts])[np.argsort(indices, kind="stable")]
        self.last_step = state.global_step
        record = None
        if state.is_world_process_zero:
            sampled = time.perf_counter() - t0
            labels = image_labels(s.seed, np.arange(s.num_images), self.num_classes, "balanced")
            metrics = self.metric(images, labels, name=f"step {state.global_step}")
            seconds = time.perf_counter() - t0
            record = self.log.append({"step": state.global_step, "epoch": state.epoch, **metrics,
                                      "seconds": round(seconds, 3), "sampling_seconds": round(sampled, 3),
                                      "settings": asdict(s)}, images)
        self.report(state, record, images, world)
        return record

    @property
    def num_classes(self) -> int:
        return self.trainer.accelerator.unwrap_model(self.trainer.model).config.num_classes

    def sample(self, indices: np.ndarray, device: torch.device) -> np.ndarray:
        """This rank's images (uint8 NHWC) with the model's current weights."""
        s = self.settings
        vae = self.trainer.vae
        if vae is not None and vae.device != device:
            vae.to(device)
        pipe = self.trainer.build_pipeline()
        pipe.set_progress_bar_config(disable=True)
        if not len(indices):
            size = pipe.vae.config.image_size
            return np.zeros((0, size, size, 3), np.uint8)
        labels = image_labels(s.seed, indices, self.num_classes, "balanced")
        return sample_images(pipe, labels, image_seeds(s.seed, indices), s.batch_size,
                             guidance_scale=s.guidance_scale, cfg_schedule=s.cfg_schedule,
                             num_inference_steps=s.num_inference_steps)

    def report(self, state: TrainerState, record: dict[str, Any] | None, images: np.ndarray, world: int) -> None:
        """The record's numbers to the Trainer's loggers, on every rank (the Trainer's own logging steps stay in
        step across ranks); on rank 0 the grid to TensorBoard and the cost to stderr."""
        from transformers.integrations import TensorBoardCallback

        scalars = None if record is None else {
            f"eval/{k}": v for k, v in record.items()
            if k not in ("step", "epoch", "settings", "grid", "num_gen", "num_ref") and isinstance(v, (int, float))}
        if world > 1:
            from accelerate.utils import broadcast_object_list

            scalars = broadcast_object_list([scalars])[0]
        self.trainer.log(scalars)
        if record is None:
            return
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_image("eval/samples", image_grid(images), state.global_step, dataformats="HWC")
                callback.tb_writer.flush()
        name = "frechet_distance" if "frechet_distance" in record else "fid"
        print(f"evaluation at step {state.global_step}: {name} {record[name]:.4f} over {self.settings.num_images} "
              f"images ({record['seconds']:.1f} s, sampling {record['sampling_seconds']:.1f} s); "
              f"{self.log.path}", file=sys.stderr, flush=True)
