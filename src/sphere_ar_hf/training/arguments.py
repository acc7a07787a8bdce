"""The AR trainer's arguments: :class:`SphereARTrainingArguments` (``TrainingArguments`` with the official recipe's
defaults and its own settings), :class:`ModelArguments` (which model, from which S-VAE) and the config they make;
and :func:`flags_in_errors`, for a script that sets them from flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy, SaveStrategy

from ..configuration_sphere_ar import PRESETS, SphereARConfig
from ..utils import OutputFolderError
from ..vae import SphereVAE
from .checkpoints import DEFAULT_CHECKPOINT_LIMIT
from .device_setup import DEFAULT_DDP_TIMEOUT, native_bf16_gpu

__all__ = ["ModelArguments", "SphereARTrainingArguments", "build_sphere_ar_config", "flags_in_errors"]


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


@contextmanager
def flags_in_errors(**flags: str) -> Iterator[None]:
    """For a script: an :class:`~sphere_ar_hf.utils.OutputFolderError` raised inside names the output folder by
    the parameter that chose it (``choose another output_dir``), as the library does; re-raise it naming the
    script's flag instead (``flags_in_errors(output_dir="--pipeline_output_dir")``)."""
    try:
        yield
    except OutputFolderError as e:
        message = str(e)
        for parameter, flag in flags.items():
            message = message.replace(f"another {parameter}", f"another {flag}")
        raise OutputFolderError(message) from e
