"""Training the SphereAR transformer with ``transformers.Trainer``: the official recipe, crash-safe checkpoints.

* :class:`SphereARTrainingArguments`: ``TrainingArguments`` whose defaults are the official recipe (AdamW
  lr 3e-4, betas (0.9, 0.95), weight decay 0.05, 20k warm-up steps, cosine decay to 1e-5 from step 20k, grad
  clipping 1.0, EMA 0.9999, bf16 on GPU, 400 epochs, per-device batch 64 = global 512 on 8 GPUs, tensorboard).
* :class:`SphereARTrainer`: takes batches of sphere tokens (``latents``, e.g. from the latent cache) or images
  (``pixel_values``, encoded on the fly by a frozen SphereVAE with posterior sampling); the official weight-decay
  rule (:mod:`.optimization`); the official learning-rate formula as a ``LambdaLR``; every random draw of the
  loss from one ``torch.Generator`` per process that is checkpointed; an EMA (:mod:`.ema`); checkpoints that are
  marked complete only once every file is on disk (:class:`CheckpointCompletionCallback`), so a run killed while
  saving never leaves a checkpoint that ``--resume_from_checkpoint latest`` would pick up.
* :func:`train_sphere_ar`: the whole run behind ``examples/train_sphere_ar.py``; it ends by writing a complete
  pipeline folder (EMA weights, the VAE, the scheduler, the dataset's class names) atomically.

Why ``Trainer`` and not one accelerate loop shared with the S-VAE trainer: the AR step is a plain
``loss.backward()`` step, which is what ``Trainer`` runs, and ``Trainer`` gives this run every
``TrainingArguments`` flag (``torch_compile``, activation checkpointing, DeepSpeed/FSDP, loggers, evaluation)
for free. The S-VAE step (two models, two optimizers, the discriminator step on the VAE's reconstructions)
does not fit ``Trainer``'s one-model loop, so it keeps its own accelerate loop. Everything here goes through
``Trainer``'s public extension points (overridden public methods, constructor arguments and callbacks), none of
its underscore methods, so that it survives transformers releases.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy

from ..configuration_sphere_ar import PRESETS, SphereARConfig
from ..loading import refuse_non_finite
from ..modeling_sphere_ar import SphereARTransformer
from ..vae import SphereVAE
from .argument_checks import check_arguments, check_input_path
from .checkpoints import (
    DEFAULT_CHECKPOINT_LIMIT,
    checkpoints_to_delete,
    mark_checkpoint_complete,
    resolve_resume_checkpoint,
)
from .device_setup import DEFAULT_DDP_TIMEOUT, check_ema_supported, native_bf16_gpu
from .ema import EMACallback, _unwrap
from .optimization import decay_parameter_names
from .sample_evaluation import SampleEvaluationCallback, SampleEvaluationSettings
from .schedules import OfficialLRLambda, OfficialLRScheduler

__all__ = [
    "CheckpointCompletionCallback",
    "ModelArguments",
    "SphereARTrainer",
    "SphereARTrainingArguments",
    "build_sphere_ar_config",
    "collate_training_batch",
    "train_sphere_ar",
]

logger = logging.getLogger(__name__)

GENERATOR_STATE_NAME = "loss_generator_{}.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# arguments


@dataclass
class SphereARTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the official SphereAR recipe as defaults, plus the recipe's own settings."""

    output_dir: str | None = field(
        default="results", metadata={"help": "Where checkpoints, tensorboard logs and the final pipeline go."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Batch size per device (official: 64 x 8 GPUs = global batch 512)."})
    num_train_epochs: float = field(default=400.0, metadata={"help": "Training epochs (official: 400)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate (official: 3e-4)."})
    min_lr: float = field(default=1e-5, metadata={"help": "Learning rate at the end of the cosine decay."})
    warmup_steps: float = field(
        default=20000,
        metadata={"help": "Linear warm-up from 0 over this many optimizer steps (a float in (0, 1): a ratio of the "
                          "total steps; official: 20000)."})
    decay_start: int = field(
        default=20000,
        metadata={"help": "Optimizer step where the cosine decay to min_lr starts (<= 0: no decay; official: 20000)."})
    official_lr_schedule: bool = field(
        default=True,
        metadata={"help": "Use the official warm-up/constant/cosine schedule (warmup_steps, decay_start, min_lr); "
                          "False: use --lr_scheduler_type instead."})
    weight_decay: float = field(
        default=0.05,
        metadata={"help": "AdamW weight decay, not applied to 1-d parameters, proj_in and class_embedding."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (official: 0.9)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (official: 0.95)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off; official: 1.0)."})
    ema_decay: float = field(
        default=0.9999,
        metadata={"help": "EMA decay of the trainable weights, updated every optimizer step; the final pipeline "
                          "gets the EMA weights (<= 0: no EMA; official: 0.9999)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (official). Default: on for a CUDA GPU with native bf16 (compute capability "
                          ">= 8) unless --fp16 is given, else off (V100/T4 only emulate bf16: pass --fp16 there).",
                  "nargs": "?", "const": True})
    ddp_timeout: int = field(
        default=DEFAULT_DDP_TIMEOUT,
        metadata={"help": "Seconds a process waits at a collective (e.g. while the main process writes a checkpoint "
                          "or the pipeline) before the run fails (default 7200; TrainingArguments' is 1800)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init, the sampler and the loss noise."})
    dataloader_num_workers: int = field(default=16, metadata={"help": "DataLoader workers per process (official: 16)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch (official)."})
    logging_steps: float = field(default=100, metadata={"help": "Log every N optimizer steps (official: 100)."})
    save_strategy: SaveStrategy | str = field(
        default="epoch", metadata={"help": "When to checkpoint: 'no', 'epoch' (official) or 'steps' (--save_steps)."})
    save_total_limit: int | None = field(
        default=DEFAULT_CHECKPOINT_LIMIT,
        metadata={"help": "Keep the newest N complete checkpoints (and the best one); <= 0: keep all (a SphereAR-B "
                          "checkpoint is about 3.3 GB)."})
    keep_checkpoints_every: int | None = field(
        default=None,
        metadata={"help": "Also keep, for good, every checkpoint whose step is a multiple of N (not counted in "
                          "--save_total_limit)."})
    logging_dir: str | None = field(
        default=None,
        metadata={"help": "Where TensorBoard logs go (default: <output_dir>/logs, as the S-VAE trainer's; the "
                          "TENSORBOARD_LOGGING_DIR environment variable overrides it)."})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Loggers to report to (official: tensorboard; 'none' for none)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the batches are built by the training datasets, not columns."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["class_labels"], metadata={"help": "Label keys of a batch (eval bookkeeping)."})
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation returns the loss only (the model has no logits to gather)."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP find_unused_parameters (every SphereAR parameter is used)."})
    hub_strategy: HubStrategy | str = field(
        default="end",
        metadata={"help": "Keep 'end': with --push_to_hub the final pipeline is pushed, never a checkpoint."})
    pipeline_output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the final pipeline folder is written (default: <output_dir>/pipeline); with "
                          "--push_to_hub it is what gets pushed (to --hub_model_id)."})
    hub_license: str | None = field(
        default=None,
        metadata={"help": "With --push_to_hub (required there): the license of the weights as a Hub license id "
                          "(mit, apache-2.0, cc-by-nc-4.0, ...), for the model card; never guessed."})

    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin the batches' memory (default: only when training on a CUDA device; on "
                                        "the CPU pinning does nothing but warn)."})
    eval_images: int = field(
        default=0,
        metadata={"help": "See quality while it trains: every --eval_steps steps (and at the last one) sample this "
                          "many images (fixed labels and seeds) with the EMA weights and log their Fréchet distance "
                          "to TensorBoard and <output_dir>/eval/ (0: off)."})
    eval_features: str = field(
        default="inception",
        metadata={"help": "Feature space of the evaluation: 'inception' (FID, IS; needs --eval_reference) or "
                          "'digits' (the digits model's).", "choices": ["inception", "digits"]})
    eval_reference: str | None = field(
        default=None,
        metadata={"help": "The reference of the evaluation: an .npz with mu/sigma (an ADM reference batch) or "
                          "images (.npz or a folder; their statistics are computed once per run)."})
    eval_inception_weights: str | None = field(
        default=None, metadata={"help": "Inception weights file (default: torch-fidelity's, downloaded once)."})
    eval_guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance of the evaluation samples (default: the model config's)."})
    eval_num_inference_steps: int = field(
        default=100, metadata={"help": "Sampler steps per token of the evaluation samples (fewer: cheaper)."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation's labels and noise."})

    def __post_init__(self):
        if self.bf16 is None:  # decided before TrainingArguments' check that fp16 and bf16 are not both on
            self.bf16 = native_bf16_gpu() and not self.use_cpu and not self.fp16
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available() and not self.use_cpu
        super().__post_init__()


@dataclass
class ModelArguments:
    """Which AR model to train and from which S-VAE (``HfArgumentParser``-ready)."""

    pretrained_vae: str = field(
        metadata={"help": "The frozen S-VAE: a SphereVAE folder or a pipeline folder (its vae/ is used). It sets the "
                          "image size, patch size and latent_dim, encodes images on the fly and goes into the final "
                          "pipeline."})
    model: str = field(
        default="SphereAR-B",
        metadata={"help": "Model size preset (official sizes).", "choices": sorted(PRESETS)})
    config_file: str | None = field(
        default=None,
        metadata={"help": "A SphereARConfig JSON file (or a folder with config.json) used instead of --model."})
    pretrained_model: str | None = field(
        default=None,
        metadata={"help": "Start from these transformer weights (a SphereARTransformer folder or a pipeline folder "
                          "with transformer/) instead of a random init."})
    class_dropout_prob: float | None = field(
        default=None, metadata={"help": "Class-label dropout for CFG (default: the config's, official 0.1)."})
    diff_batch_mul: int | None = field(
        default=None, metadata={"help": "Head batch repetition (default: the config's, official 4)."})
    normalize_tokens: bool | None = field(
        default=None,
        metadata={"help": "Train on and sample tokens projected onto the sphere (default: the config's, True: "
                          "SphereAR). False with a Gaussian S-VAE trains on its raw draws and samples without "
                          "projection: the baselines of the paper's ablation."})


def build_sphere_ar_config(model_args: ModelArguments, vae: SphereVAE, num_classes: int) -> SphereARConfig:
    """The transformer config: preset or file, with the token grid from the VAE and the class count from the data."""
    tokens = dict(image_size=vae.config.image_size, patch_size=vae.config.patch_size,
                  latent_dim=vae.config.latent_dim, num_classes=int(num_classes))
    extra = {k: v for k, v in (("class_dropout_prob", model_args.class_dropout_prob),
                               ("diff_batch_mul", model_args.diff_batch_mul),
                               ("normalize_tokens", model_args.normalize_tokens)) if v is not None}
    if model_args.config_file:
        base = SphereARConfig.from_pretrained(model_args.config_file).to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            base.pop(key, None)
        return SphereARConfig(**{**base, **tokens, **extra})
    return SphereARConfig.from_preset(model_args.model, **tokens, **extra)


# ---------------------------------------------------------------------------------------------------------------
# batches


def collate_training_batch(items: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Stack dataset items (``latents`` or ``pixel_values``, ``class_labels``, anything else tensor-valued).

    ``None`` items (undecodable images) are dropped; a batch with none left is ``{}`` and the trainer then runs a
    zero-weight step so that every process still steps together.
    """
    if any(it is not None and "pixel_values" in it for it in items):
        from .data import collate_images

        out = collate_images(items)  # counts undecodable images
        if out is None:
            return {}
        extra = {k for it in items if it is not None for k in it} - set(out)
        kept = [it for it in items if it is not None]
        out.update({k: torch.stack([torch.as_tensor(it[k]) for it in kept]) for k in sorted(extra)})
        return out
    kept = [it for it in items if it is not None]
    if not kept:
        return {}
    return {k: torch.stack([torch.as_tensor(it[k]) for it in kept]) for k in kept[0]}


class _DatasetEpochCallback(TrainerCallback):
    """Calls ``train_dataset.set_epoch(epoch)`` at the start of every epoch (augmentation / posterior draws)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


# ---------------------------------------------------------------------------------------------------------------
# the trainer


class CheckpointCompletionCallback(TrainerCallback):
    """Makes the checkpoints of a :class:`SphereARTrainer` crash-safe, from the Trainer's public ``on_*`` events.

    * before a step that saves (``on_step_end`` / ``on_epoch_end`` with ``should_save``): removes a
      ``checkpoint-<step>`` folder an earlier, killed run left, so that no file of it survives in the new one;
    * ``on_train_begin``: restores this process's loss generator from the checkpoint the run resumes from;
    * ``on_save`` (after the Trainer wrote the checkpoint and earlier callbacks, e.g. the EMA, added theirs):
      writes this process's loss-generator state, calls :meth:`SphereARTrainer.on_checkpoint_written`, waits for
      every process, writes the completion marker, then keeps the newest ``save_total_limit`` complete
      checkpoints (and the best one) and deletes incomplete ones. The trainer must be its last callback.
    """

    def __init__(self, trainer: SphereARTrainer):
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


def _count(n: int, word: str) -> str:
    """``"1 class"``, ``"4 classes"``, ``"16 examples"``."""
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


class _StartupSummaryCallback(TrainerCallback):
    """Prints :meth:`SphereARTrainer.startup_summary` once, on the main process, when training starts."""

    def __init__(self, trainer: SphereARTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs) -> None:
        if state.is_world_process_zero:
            print(self.trainer.startup_summary(state, kwargs.get("train_dataloader")), file=sys.stderr, flush=True)


class SphereARTrainer(Trainer):
    """``Trainer`` for :class:`SphereARTransformer` (see the module docstring).

    Only public ``Trainer`` extension points are used: ``compute_loss`` / ``training_step`` / ``evaluate``,
    ``get_decay_parameter_names`` and ``create_scheduler``, ``train`` (to resolve ``"latest"``) and callbacks
    (:class:`~.ema.EMACallback`, the dataset's ``set_epoch``, :class:`CheckpointCompletionCallback`). The
    trainer rotates checkpoints itself, counting only complete ones, so it keeps ``args.save_total_limit`` as
    :attr:`save_total_limit` and runs the Trainer on a copy of ``args`` without it. The Hub repository gets the
    final pipeline (:meth:`push_pipeline_to_hub`): ``push_to_hub`` needs ``hub_strategy="end"`` (the default
    of :class:`SphereARTrainingArguments`), since a pushed checkpoint would not have its completion marker yet.

    Args:
        model: the transformer to train.
        args: training arguments (:class:`SphereARTrainingArguments` for the recipe's extra settings).
        vae: the frozen S-VAE; needed for ``pixel_values`` batches and for :meth:`save_pipeline`.
        **kwargs: everything else ``transformers.Trainer`` takes (``train_dataset``, ``callbacks``, ...).
    """

    def __init__(self, model: SphereARTransformer, args: TrainingArguments, vae: SphereVAE | None = None,
                 train_dataset: Any = None, data_collator: Callable | None = None,
                 callbacks: list[TrainerCallback] | None = None, **kwargs):
        if args.push_to_hub and args.hub_strategy != HubStrategy.END:
            raise ValueError(f"push_to_hub with hub_strategy={args.hub_strategy.value!r}: the SphereAR trainer "
                             "pushes the final pipeline, not checkpoints; set hub_strategy='end'")
        if args.push_to_hub:  # the card's license is checked before any training (sphere-ar push's rule)
            from ..hub import check_license

            check_license(getattr(args, "hub_license", None), None, None)
        self.save_total_limit = args.save_total_limit
        self.keep_checkpoints_every = getattr(args, "keep_checkpoints_every", None)
        if args.save_total_limit is not None:
            args = copy.copy(args)  # the Trainer's own rotation would count the checkpoint being written
            args.save_total_limit = None
        callbacks = list(callbacks or [])
        ema_decay = float(getattr(args, "ema_decay", 0.0) or 0.0)
        check_ema_supported(args, ema_decay)
        self.ema_callback = EMACallback(ema_decay) if ema_decay > 0 else None
        if self.ema_callback is not None:
            callbacks.append(self.ema_callback)  # before the completion marker: writes ema.safetensors on save
        evaluation = SampleEvaluationSettings.from_training_args(args)
        if train_dataset is not None:
            callbacks.append(_DatasetEpochCallback(train_dataset))
        callbacks.append(_StartupSummaryCallback(self))
        callbacks.append(CheckpointCompletionCallback(self))
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         data_collator=data_collator or collate_training_batch, callbacks=callbacks, **kwargs)
        self.logging_dir = self._route_tensorboard()
        if evaluation is not None:  # after the EMA's update of the step (an earlier callback)
            self.add_callback(SampleEvaluationCallback(self, evaluation))
        # The loss is a per-batch mean over tokens and noise draws: the Trainer scales it for gradient
        # accumulation, and never counts items (batches have no "labels").
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.normalize_tokens = bool(getattr(model.config, "normalize_tokens", True))
        self.generator = torch.Generator(device=self.args.device)
        self.generator.manual_seed(self.args.seed * self.args.world_size + self.args.process_index)
        self._eval_generator = torch.Generator(device=self.args.device)
        self._official_lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.resumed_from: str | None = None

    # ---- logs and the startup summary ----------------------------------------------------------------------
    def _route_tensorboard(self) -> str:
        """Point the Trainer's TensorBoard callbacks at ``args.logging_dir`` (default ``<output_dir>/logs``, where
        the S-VAE trainer logs too) unless ``TENSORBOARD_LOGGING_DIR`` is set; returns that folder."""
        from transformers.integrations import TensorBoardCallback

        folder = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(self.args, "logging_dir", None) or str(
            Path(self.args.output_dir) / "logs")
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
                callback.logging_dir = os.path.expanduser(folder)
        return folder

    def startup_summary(self, state: TrainerState, train_dataloader: Any = None) -> str:
        """A few lines on what this run does: parameters, data, steps (and the epochs they make, as the Trainer
        counts them: optimizer steps over the steps of one pass of ``train_dataloader``), the effective batch,
        where files go."""
        model = _unwrap(self.model)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = getattr(model, "config", None)
        args, world = self.args, self.args.world_size
        effective = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        try:
            examples = _count(len(self.train_dataset), "example")
        except TypeError:
            examples = "streamed"
        classes = f", {_count(config.num_classes, 'class')}" if config is not None else ""
        start = f", resuming at step {state.global_step:,}" if state.global_step else ""
        try:
            per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
            count = state.max_steps / per_epoch
            epochs = f" ({count:.3g} epoch{'' if count == 1 else 's'} of {_count(per_epoch, 'step')})"
        except TypeError:  # no dataloader, or a streamed one
            epochs = ""
        limit = self.save_total_limit
        kept = (f"the newest {limit}" if limit and limit > 0 else "all") + (
            f" and every {self.keep_checkpoints_every}-th step" if self.keep_checkpoints_every else "")
        lines = [
            "SphereAR training",
            f"  parameters: {total:,} ({trainable:,} trainable)",
            f"  data:       {examples}{classes}",
            f"  steps:      {state.max_steps:,} optimizer steps{epochs}{start}",
            f"  batch:      {args.per_device_train_batch_size} per device x {world} "
            f"process{'es' if world != 1 else ''} x {args.gradient_accumulation_steps} accumulation = {effective} "
            "per step",
            f"  output:     {args.output_dir} (checkpoints: keep {kept}; TensorBoard logs: {self.logging_dir})",
        ]
        return "\n".join(lines)

    # ---- loss ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """AR tokens of images in [-1, 1]: ``vae.tokens(vae.encode(x).latent_dist.sample(generator))``, projected
        onto the sphere unless the model's ``normalize_tokens`` is off and the posterior is Gaussian."""
        if self.vae is None:
            raise ValueError("this batch holds pixel_values but the trainer has no VAE: pass vae= (or train from a "
                             "latent cache)")
        device = pixel_values.device
        if self.vae.device != device:
            self.vae.to(device)
        dist = self.vae.encode(pixel_values.to(device, self.vae.dtype)).latent_dist
        return self.vae.tokens(dist.sample(generator).float(), normalize=self.normalize_tokens)

    def _dummy_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        c = _unwrap(model).config
        latents = torch.zeros(1, c.num_image_tokens, c.latent_dim, device=self.args.device)
        latents[..., 0] = math.sqrt(c.latent_dim)
        return {"latents": latents, "class_labels": torch.full((1,), c.num_classes, device=self.args.device)}

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Flow-matching loss of a batch of ``latents`` or ``pixel_values`` (encoded here) and ``class_labels``."""
        generator = self.generator if model.training else self._eval_generator
        latents = inputs.get("latents")
        if latents is None:
            if "pixel_values" not in inputs:
                raise ValueError(f"a training batch needs 'latents' or 'pixel_values', got keys {sorted(inputs)}")
            latents = self.encode_images(inputs["pixel_values"], generator)
        latents, labels = latents.float(), inputs["class_labels"]
        # drawn here, outside the model: a generator inside forward splits a --torch_compile graph in five
        draws = _unwrap(model).draw_training_inputs(latents, labels, generator)
        outputs = model(latents=latents, class_labels=labels, **draws)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        if not inputs:  # every image of the batch was undecodable: a zero-weight step keeps the processes in step
            logger.warning("empty batch (every image undecodable): running a zero-weight step")
            model.train()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, self._dummy_inputs(model)) * 0.0
            self.accelerator.backward(loss)
            return loss.detach()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self._eval_generator.manual_seed(self.args.seed)  # the same noise at every evaluation
        return super().evaluate(*args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Rough training FLOPs: 6 x parameters x image tokens."""
        labels = inputs.get("class_labels")
        if labels is None:
            return 0
        config = _unwrap(self.model).config
        return 6 * _unwrap(self.model).num_parameters() * labels.numel() * config.num_image_tokens

    # ---- optimizer and schedule ----------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The official rule (:func:`~.optimization.decay_parameter_names`): no decay on 1-d parameters and on the
        modules the model lists in ``_no_weight_decay_modules``; under PEFT that leaves the LoRA matrices."""
        return decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
                         ) -> torch.optim.lr_scheduler.LRScheduler:
        """The official schedule (:class:`~.schedules.OfficialLRScheduler`, rebuilt for every ``train`` call from
        the current arguments, also on resume), unless ``official_lr_schedule`` is off or a scheduler was given to
        the constructor."""
        if not getattr(self.args, "official_lr_schedule", False) or (
                self.lr_scheduler is not None and self.lr_scheduler is not self._official_lr_scheduler):
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        fn = OfficialLRLambda(num_training_steps, self.args.learning_rate, self.args.min_lr,
                              self.args.get_warmup_steps(num_training_steps), self.args.decay_start)
        self.lr_scheduler = self._official_lr_scheduler = OfficialLRScheduler(optimizer, fn)
        return self.lr_scheduler

    # ---- checkpoints and resume ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> Any:
        """``Trainer.train`` with ``resume_from_checkpoint="latest"`` (newest complete checkpoint, or a fresh start)."""
        folder = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        self.resumed_from = folder
        if self.ema_callback is not None:
            self.ema_callback.resume_from_checkpoint = folder
        if folder is not None:
            logger.info("resuming from %s", folder)
        return super().train(resume_from_checkpoint=folder, **kwargs)

    def on_checkpoint_written(self, folder: Path) -> None:
        """Called on every process once its files of a checkpoint are written, before the checkpoint is marked
        complete: a subclass may add files here (the tests stop a run at this point)."""

    # ---- final pipeline ------------------------------------------------------------------------------------
    def build_pipeline(self, id2label: dict[int, str] | None = None, scheduler: Any = None) -> Any:
        """A :class:`SphereARPipeline` of the current transformer (EMA weights after training), the VAE, a scheduler."""
        from ..pipeline_sphere_ar import SphereARPipeline
        from ..scheduling_sphere_ar import SphereARScheduler

        if self.vae is None:
            raise ValueError("build_pipeline needs the VAE: pass vae= to the trainer")
        transformer = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return SphereARPipeline(transformer=transformer, vae=self.vae, scheduler=scheduler or SphereARScheduler(),
                                id2label=id2label)

    def training_record(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the final save records about this run (``hub.TRAINING_INFO_KEY`` in ``transformer/config.json``,
        shown by ``sphere-ar push``'s card): ``data`` (:func:`training_data_record`) plus steps, epochs, the
        effective batch size, the peak learning rate and the date."""
        import datetime

        from .. import __version__

        args = self.args
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        return {**(data or {}), "global_step": int(self.state.global_step),
                "epochs": round(float(self.state.epoch or 0.0), 4),
                "effective_batch_size": int(args.per_device_train_batch_size * args.gradient_accumulation_steps
                                            * world),
                "learning_rate": float(args.learning_rate), "seed": int(args.seed),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "trainer": f"sphere-ar-hf {__version__} {type(self).__name__}"}

    def save_pipeline(self, output_dir: str | os.PathLike, id2label: dict[int, str] | None = None,
                      inputs: Sequence[str | os.PathLike | None] = (),
                      training_data: dict[str, Any] | None = None) -> Path:
        """Write the pipeline folder atomically (temporary folder, then rename) on the main process.

        An existing ``output_dir`` is replaced only if it is a pipeline folder that holds none of ``inputs`` (the
        paths the run read: ``utils.check_output_folder``). The transformer's config records the run
        (:meth:`training_record` of ``training_data``)."""
        from ..hub import TRAINING_INFO_KEY
        from ..utils import write_folder_atomically

        output_dir = Path(output_dir)
        refuse_non_finite(self.accelerator.unwrap_model(self.model), "transformer")
        if self.args.should_save:
            pipe = self.build_pipeline(id2label)
            setattr(pipe.transformer.config, TRAINING_INFO_KEY, self.training_record(training_data))
            write_folder_atomically(output_dir, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True),
                                    overwrite=True, kind="pipeline", inputs=inputs, option="--pipeline_output_dir")
            logger.info("wrote the pipeline to %s", output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir

    def push_pipeline_to_hub(self, folder: str | os.PathLike, commit_message: str = "End of training") -> str | None:
        """Upload a saved pipeline folder to ``args.hub_model_id`` through ``sphere-ar push``'s publisher
        (:func:`..hub.push_pipeline`: the model card that fits, with ``args.hub_license``, and the remote code);
        returns the repository's URL on the main process."""
        if not self.args.should_save:
            return None
        from ..hub import push_pipeline

        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        url = push_pipeline(folder, repo_id, license=getattr(self.args, "hub_license", None),
                            private=bool(self.args.hub_private_repo), commit_message=commit_message,
                            revision=self.args.hub_revision, token=self.args.hub_token)
        logger.info("pushed the pipeline to %s", url)
        return url


# ---------------------------------------------------------------------------------------------------------------
# the whole run


def _public_name(name: str | None) -> str | None:
    """A dataset / model reference fit for a public card: a Hub id as it is, a local path by its last part."""
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return path.name if path.is_absolute() or path.exists() else str(name)


def training_data_record(data_args: Any, dataset: Any = None) -> dict[str, Any]:
    """What a run trained on, for :meth:`SphereARTrainer.training_record`: the dataset (a Hub id, or a local
    folder by its name; through a latent cache, the cache's source), split, number of examples and classes."""
    import types

    source = data_args
    if getattr(data_args, "latent_cache", None):
        info = getattr(dataset, "info", None) or getattr(getattr(dataset, "dataset", None), "info", None)
        source = types.SimpleNamespace(**(info.get("source") or {})) if isinstance(info, dict) else None
    record: dict[str, Any] = {}
    hub_id = getattr(source, "dataset_name", None)
    if hub_id:
        record["dataset"] = _public_name(hub_id)
        if record["dataset"] == hub_id:
            record["hub_dataset"] = hub_id
    elif getattr(source, "train_data_dir", None):
        record["dataset"] = f"{_public_name(source.train_data_dir)} (a local image folder)"
    elif getattr(source, "dataset_path", None):
        record["dataset"] = f"{_public_name(source.dataset_path)} (a local dataset folder)"
    if getattr(data_args, "latent_cache", None):
        cache = f"latent cache {_public_name(data_args.latent_cache)}"
        record["dataset"] = f"{record['dataset']}, through the {cache}" if record.get("dataset") else cache
    if getattr(source, "split", None):
        record["split"] = source.split
    try:
        record["num_examples"] = len(dataset) if dataset is not None else None
    except TypeError:  # a streamed dataset
        pass
    if getattr(dataset, "num_classes", None):
        record["num_classes"] = int(dataset.num_classes)
    return {k: v for k, v in record.items() if v is not None}


def _load_transformer(path: str, config: SphereARConfig) -> SphereARTransformer:
    if (Path(path) / "transformer" / "config.json").is_file():
        model = SphereARTransformer.from_pretrained(path, subfolder="transformer")
    else:
        model = SphereARTransformer.from_pretrained(path)
    for key in ("num_image_tokens", "latent_dim", "num_classes"):
        if getattr(model.config, key) != getattr(config, key):
            raise ValueError(f"--pretrained_model {path}: {key} = {getattr(model.config, key)}, but the VAE/data "
                             f"need {getattr(config, key)}")
    model.config.class_dropout_prob = config.class_dropout_prob
    model.config.diff_batch_mul = config.diff_batch_mul
    return model


def train_sphere_ar(model_args: ModelArguments, data_args: Any, training_args: TrainingArguments,
                    callbacks: list[TrainerCallback] | None = None,
                    dataset_wrapper: Callable[[Any], Any] | None = None) -> Path:
    """Train a SphereAR transformer and write the pipeline folder; returns its path.

    Data: ``data_args.latent_cache`` (sphere tokens sampled from cached posteriors) or images (``DataArguments``),
    encoded on the fly by the VAE. ``dataset_wrapper`` may wrap the training dataset (e.g. to log what is read).
    """
    from transformers import set_seed

    from ..utils import check_output_folder
    from .data import build_image_dataset, class_names, resolve_num_classes
    from .latent_cache import LatentCacheDataset, check_latent_cache, data_inputs, load_vae

    check_arguments(model_args, training_args, data_args)
    for flag in ("pretrained_vae", "config_file", "pretrained_model"):
        check_input_path(f"--{flag}", getattr(model_args, flag))
    out = Path(getattr(training_args, "pipeline_output_dir", None) or Path(training_args.output_dir) / "pipeline")
    inputs = [model_args.pretrained_vae, model_args.pretrained_model, *data_inputs(data_args)]
    check_output_folder(out, True, kind="pipeline", inputs=inputs, option="--pipeline_output_dir")  # before training
    set_seed(training_args.seed)
    vae = load_vae(model_args.pretrained_vae).float()
    if data_args.latent_cache:
        info = check_latent_cache(data_args.latent_cache, vae)
        num_classes, id2label = int(info["num_classes"]), info.get("id2label")
        if data_args.num_classes and data_args.num_classes != num_classes:
            raise ValueError(f"--num_classes {data_args.num_classes} does not match the latent cache "
                             f"{data_args.latent_cache}, which holds {num_classes} classes; drop --num_classes")
    else:
        if data_args.resolution != vae.config.image_size:
            logger.info("resolution set to the VAE's image_size %d", vae.config.image_size)
            data_args.resolution = vae.config.image_size
        # the class count and names come from the dataset; a --num_classes that differs is refused here
        dataset = build_image_dataset(data_args, seed=training_args.seed, strict_num_classes=True)
        id2label = class_names(dataset.dataset, data_args.label_column)
        num_classes = resolve_num_classes(data_args, dataset)
    config = build_sphere_ar_config(model_args, vae, num_classes)
    if data_args.latent_cache:  # its tokens follow the model's normalize_tokens
        dataset = LatentCacheDataset(data_args.latent_cache, seed=training_args.seed, hflip=data_args.hflip,
                                     normalize=config.normalize_tokens)
    set_seed(training_args.seed)
    if model_args.pretrained_model:
        model = _load_transformer(model_args.pretrained_model, config)
    else:
        model = SphereARTransformer(config)
    if dataset_wrapper is not None:
        dataset = dataset_wrapper(dataset)
    trainer = SphereARTrainer(model=model, args=training_args, vae=vae, train_dataset=dataset, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_pipeline(out, id2label, inputs=inputs, training_data={
        **training_data_record(data_args, dataset), "init": _public_name(model_args.pretrained_model) or "random"})
    if training_args.push_to_hub:
        trainer.push_pipeline_to_hub(out)
    return out
