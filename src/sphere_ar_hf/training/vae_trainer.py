"""Training the S-VAE (SphereVAE + PatchGAN) with ``accelerate``: arguments, the official recipe's pieces, the loop.

``train_vae`` is the whole run (``examples/train_vae.py`` only parses arguments). One optimizer step is the
official one: the VAE step on L1 + LPIPS + KL + adversarial loss, then the discriminator step on the same
reconstructions (detached, computed before the VAE update). Defaults are the official S-VAE recipe (the
README's command: 100 epochs, global batch 256, lr 1e-4 constant, AdamW betas (0.9, 0.95), weight decay 0.05
on >= 2-D tensors, gradient clipping 1.0, bf16, discriminator from step 20000).

Checkpoints are ``accelerator.save_state`` folders written under a temporary name and renamed into place with a
completion marker, so that ``--resume_from_checkpoint latest`` never picks a half-written one. A resumed run
continues bit for bit (same device count and batch geometry): the posterior samples take a generator seeded
from ``(seed, step, micro-batch, rank)``, the data order and augmentation are functions of ``(seed, epoch)``,
and the global RNG (LPIPS dropout) is restored by ``load_state``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..loading import refuse_non_finite
from ..options import POSTERIORS
from ..power_spherical import PowerSphericalDistribution
from ..utils import (
    atomic_write,
    check_output_folder,
    remove_staged_folders,
    shared_staging_path,
    stage_folder,
    swap_folder_into_place,
    write_folder_atomically,
)
from ..vae import SphereVAE
from .argument_checks import check_arguments, check_input_path
from .checkpoints import (
    DEFAULT_CHECKPOINT_LIMIT,
    mark_checkpoint_complete,
    resolve_resume_checkpoint,
    rotate_checkpoints,
)
from .data import DataArguments, build_image_dataset, collate_images
from .device_setup import DEFAULT_DDP_TIMEOUT, process_group_kwargs, resolve_mixed_precision
from .latent_cache import data_inputs
from .losses import DISC_LOSSES, GEN_LOSSES, REC_LOSSES, PatchGANDiscriminator, SphereVAELoss
from .optimization import official_param_groups
from .reconstruction_evaluation import ReconstructionEvaluation, first_pixel_values
from .schedules import official_learning_rate

__all__ = [
    "LogMeter",
    "PairedDiscriminator",
    "ResumableDistributedSampler",
    "TrainState",
    "VAEModelArguments",
    "VAETrainingArguments",
    "VAEWithPosterior",
    "build_discriminator",
    "build_vae",
    "posterior_generator",
    "save_checkpoint_atomically",
    "save_preview",
    "train_vae",
]

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------
# arguments


GAUSSIAN_KL_WEIGHT = 1e-3
# the KL weight of each posterior when --kl_weight is not given: the official S-VAE's, and one for the Gaussian
# baseline at which its aggregate posterior stays near N(0, I) in the digits recipe (per-dimension std 0.99, token
# norm 3.9 +- 0.7 on the test split, i.e. about the sphere's radius 4; 1e-4 gives 0.94 and 3.7 +- 0.8)
DEFAULT_KL_WEIGHTS = {"power_spherical": 0.004, "gaussian": GAUSSIAN_KL_WEIGHT}


@dataclass
class VAEModelArguments:
    """The S-VAE and discriminator architecture (``HfArgumentParser``-ready). Unset sizes come from
    ``vae_config`` or else the official 75M S-VAE; the image size is always the data ``resolution``."""

    vae_config: str | None = field(
        default=None, metadata={"help": "A SphereVAE config.json (or a folder holding one) to build the VAE from."}
    )
    pretrained_vae: str | None = field(
        default=None,
        metadata={"help": "Start from these SphereVAE weights (a SphereVAE folder, a pipeline folder with vae/, or a "
                          "Hub id) instead of the official random initialisation."},
    )
    latent_dim: int | None = field(default=None, metadata={"help": "Latent token width d (official: 16)."})
    patch_size: int | None = field(default=None, metadata={"help": "Pixels per token side (official: 16)."})
    z_channels: int | None = field(default=None, metadata={"help": "ViT width (official: 512)."})
    cnn_channels: list[int] | None = field(
        default=None,
        metadata={"help": "CNN stage widths, one 2x downsampling between stages; the last equals z_channels "
                          "(official: 64 64 128 256 512)."},
    )
    encoder_layers: int | None = field(default=None, metadata={"help": "Encoder ViT blocks (official: 6)."})
    decoder_layers: int | None = field(default=None, metadata={"help": "Decoder ViT blocks (official: 12)."})
    num_register_tokens: int | None = field(default=None, metadata={"help": "ViT register tokens (official: 4)."})
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "ViT attention heads (official: z_channels / 64)."}
    )
    posterior: str | None = field(
        default=None,
        metadata={"help": "The posterior: 'power_spherical' (the S-VAE, official) or 'gaussian' (the diagonal-Gaussian "
                          "baseline of the paper's ablation, KL to N(0, I)).", "choices": list(POSTERIORS)},
    )
    normalize_decoder_input: bool | None = field(
        default=None,
        metadata={"help": "Project the decoder's input onto the radius-sqrt(d) sphere (default True; the Power "
                          "Spherical posterior needs it, a Gaussian one may go without)."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the ViT blocks' activations in the backward pass (saves memory)."}
    )
    disc_channels: int = field(default=64, metadata={"help": "PatchGAN base width (official: 64)."})
    disc_layers: int = field(default=3, metadata={"help": "PatchGAN stride-2 layers (official: 3)."})


@dataclass
class VAETrainingArguments:
    """Optimisation, losses, checkpointing and logging of the S-VAE run (``HfArgumentParser``-ready)."""

    output_dir: str = field(
        metadata={"help": "Run folder: checkpoint-<step>/, previews/, logs/ and, at the end, vae/ and discriminator/."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order, augmentation, sampling."})
    global_batch_size: int = field(
        default=256, metadata={"help": "Images per optimizer step over all processes (official: 256)."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step; the per-device batch is global_batch_size / "
                          "(processes * gradient_accumulation_steps)."},
    )
    num_train_epochs: int = field(default=100, metadata={"help": "Epochs (official S-VAE: 100)."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides num_train_epochs; required "
                                        "for streamed datasets)."}
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate of both models (official: 1e-4)."}
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "Linear warmup steps from 0 (official S-VAE: none; <= 0 disables)."}
    )
    lr_decay_start: int = field(
        default=-1,
        metadata={"help": "Step from which the lr decays to min_lr with a cosine until the last step (official S-VAE:"
                          " -1 = constant lr; <= 0 disables)."},
    )
    min_lr: float = field(default=1e-5, metadata={"help": "Final lr of the cosine decay (official: 1e-5)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (official: 0.9)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (official: 0.95)."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay of >= 2-D tensors; 1-D ones get none (official: 0.05)."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping of each model's gradients (official: 1.0; 0 disables)."}
    )
    reconstruction_loss: Literal["l1", "l2"] = field(
        default="l1", metadata={"help": f"Pixel loss, one of {sorted(REC_LOSSES)} (official: l1)."}
    )
    reconstruction_weight: float = field(default=1.0, metadata={"help": "Pixel loss weight (official: 1.0)."})
    perceptual_weight: float = field(default=1.0, metadata={"help": "LPIPS (VGG) loss weight (official: 1.0)."})
    kl_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the KL, mean per token: to the uniform sphere for the Power Spherical posterior "
                          f"(official: {DEFAULT_KL_WEIGHTS['power_spherical']:g}), to N(0, I) summed over the "
                          f"dimensions for the Gaussian one (default {DEFAULT_KL_WEIGHTS['gaussian']:g})."},
    )
    disc_weight: float = field(
        default=0.5, metadata={"help": "Weight of both adversarial losses once on (official: 0.5; no adaptive weight)."}
    )
    disc_start: int = field(
        default=20000,
        metadata={"help": "Optimizer step (1-based) from which the adversarial losses are on (official: 20000)."},
    )
    disc_loss: Literal["hinge", "vanilla", "non-saturating"] = field(
        default="hinge", metadata={"help": f"Discriminator loss, one of {sorted(DISC_LOSSES)} (official: hinge)."}
    )
    gen_loss: Literal["hinge", "non-saturating"] = field(
        default="hinge",
        metadata={"help": f"Generator adversarial loss, one of {sorted(GEN_LOSSES)} (official: hinge)."},
    )
    lpips_dropout: bool = field(
        default=True,
        metadata={"help": "Keep LPIPS's dropout active during training, as the official code does (its loss module "
                          "is in training mode)."},
    )
    lpips_random_backbone: bool = field(
        default=False,
        metadata={"help": "Testing only: a random VGG16 in LPIPS (no download; the perceptual loss is meaningless)."},
    )
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto",
        metadata={"help": "'bf16' autocast (official), 'no' (float32), or 'auto': bf16 on a CUDA GPU with native bf16 "
                          "(compute capability >= 8), else float32 (V100/T4 only emulate bf16, slower than float32)."}
    )
    ddp_timeout: int = field(
        default=DEFAULT_DDP_TIMEOUT,
        metadata={"help": "Seconds a process waits at a collective (e.g. while the main process writes a checkpoint) "
                          "before the run fails."}
    )
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls/convolutions on GPU (official)."})
    dataloader_num_workers: int = field(
        default=16, metadata={"help": "DataLoader worker processes per process (official: 16)."}
    )
    logging_steps: int = field(default=100, metadata={"help": "Log averaged losses every N steps (official: 100)."})
    disable_tqdm: bool = field(
        default=False, metadata={"help": "Hide the progress bar (steps, speed, ETA; shown on the main process)."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "accelerate tracker: tensorboard (logs in <output_dir>/logs, as the AR trainer's), wandb, "
                          "..., 'all' or 'none'."},
    )
    tracker_project_name: str = field(default="train_vae", metadata={"help": "Tracker run/project name."})
    checkpointing_steps: int = field(
        default=5000, metadata={"help": "Save a resumable checkpoint-<step> folder every N steps (and at the end)."}
    )
    checkpoints_total_limit: int | None = field(
        default=DEFAULT_CHECKPOINT_LIMIT,
        metadata={"help": "Keep only the newest N complete checkpoints (<= 0: keep all)."},
    )
    keep_checkpoints_every: int | None = field(
        default=None,
        metadata={"help": "Also keep, for good, every checkpoint whose step is a multiple of N (not counted in "
                          "--checkpoints_total_limit)."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' for the newest complete one in output_dir (a fresh run "
                          "if there is none)."},
    )
    validation_steps: int = field(
        default=5000, metadata={"help": "Write a reconstruction preview PNG every N steps (and at the end)."}
    )
    num_validation_images: int = field(
        default=8, metadata={"help": "Images in the preview (top row: inputs, bottom row: reconstructions)."}
    )
    eval_steps: int = field(
        default=0,
        metadata={"help": "Every N steps (and at the end) measure the reconstruction Fréchet distance of "
                          "--eval_images fixed images (TensorBoard and <output_dir>/eval/; 0: off)."},
    )
    eval_images: int = field(default=0, metadata={"help": "Images of the reconstruction evaluation (0: off)."})
    eval_features: Literal["inception", "digits"] = field(
        default="inception", metadata={"help": "Feature space of the reconstruction evaluation: inception or digits."}
    )
    eval_inception_weights: str | None = field(
        default=None, metadata={"help": "Inception weights file (default: torch-fidelity's, downloaded once)."}
    )


# ---------------------------------------------------------------------------------------------------------------
# models


def build_vae(model_args: VAEModelArguments, image_size: int) -> SphereVAE:
    """A SphereVAE from ``pretrained_vae``, or ``vae_config`` + flags with the official initialisation."""
    sizes = {k: getattr(model_args, k) for k in ("latent_dim", "patch_size", "z_channels", "cnn_channels",
                                                 "encoder_layers", "decoder_layers", "num_register_tokens",
                                                 "num_attention_heads", "posterior", "normalize_decoder_input")}
    if model_args.pretrained_vae:
        from .latent_cache import load_vae

        vae = load_vae(model_args.pretrained_vae)
        given = {k: v for k, v in sizes.items() if v is not None}
        if given or model_args.vae_config:
            raise ValueError(f"--pretrained_vae fixes the architecture; drop {sorted(given) or ['--vae_config']}")
        if vae.config.image_size != image_size:
            raise ValueError(f"the pretrained VAE is for {vae.config.image_size}px images; set --resolution "
                             f"{vae.config.image_size} (got {image_size})")
        return vae
    config: dict[str, Any] = {}
    if model_args.vae_config:
        config = dict(SphereVAE.load_config(model_args.vae_config))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if config.get("image_size", image_size) != image_size:
            logger.warning("vae_config image_size %s replaced by the data resolution %d", config["image_size"],
                           image_size)
    config.update({k: v for k, v in sizes.items() if v is not None})
    config["image_size"] = image_size
    if "cnn_channels" in config:
        config["cnn_channels"] = tuple(config["cnn_channels"])
    return SphereVAE(**config)  # the official initialisation (SphereVAE.initialize_weights)


def kl_weight(args: VAETrainingArguments, vae: SphereVAE) -> float:
    """``args.kl_weight``, or the default of the VAE's posterior (:data:`DEFAULT_KL_WEIGHTS`)."""
    return DEFAULT_KL_WEIGHTS[vae.config.posterior] if args.kl_weight is None else args.kl_weight


def build_discriminator(model_args: VAEModelArguments) -> PatchGANDiscriminator:
    return PatchGANDiscriminator(in_channels=3, base_channels=model_args.disc_channels,
                                 num_layers=model_args.disc_layers)


class VAEWithPosterior(nn.Module):
    """The trained module: encode, sample the posterior with ``generator``, decode (which projects onto the sphere
    when ``normalize_decoder_input``).

    One ``forward`` (so that DDP sees the whole graph); returns ``(reconstruction, mean per-token KL to the prior
    (the uniform sphere, or N(0, I)), a log of the posterior's spread)``: ``{"kappa": mean kappa}`` or
    ``{"posterior_std": mean standard deviation}``.
    """

    def __init__(self, vae: SphereVAE):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images).latent_dist
        recon = self.vae.decode(dist.sample(generator)).sample
        spread = {"kappa": dist.kappa.detach().mean()} if isinstance(dist, PowerSphericalDistribution) else \
            {"posterior_std": dist.std.detach().mean()}
        return recon, dist.kl().mean(), spread


class PairedDiscriminator(nn.Module):
    """Runs the discriminator on real and fake images separately (BatchNorm statistics per batch, as the
    official code) inside one ``forward``, so that DDP sees a single call."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


def posterior_generator(seed: int, step: int, micro_batch: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for one micro-batch's posterior sample, seeded from ``(seed, step, micro_batch, rank)``: the
    draws need no saved state and a resumed run repeats them exactly."""
    key = hashlib.sha256(f"sphere-vae/{seed}/{step}/{micro_batch}/{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


# ---------------------------------------------------------------------------------------------------------------
# data position and checkpoints


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (the official sampler: shuffled with ``seed + epoch``, sharded by rank) that can
    start after the first ``start_index`` indices of this rank's share, to resume mid-epoch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


@dataclass
class TrainState:
    """What ``accelerate`` does not save itself: the step, the data position and the batch geometry."""

    global_step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    global_batch_size: int = 0
    num_processes: int = 0
    gradient_accumulation_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def save_checkpoint_atomically(accelerator: Any, output_dir: str | os.PathLike, step: int,
                               extra: dict[str, Any] | None = None, total_limit: int | None = None,
                               keep_every: int | None = None) -> Path:
    """``accelerator.save_state`` into a staging folder (``utils.stage_folder(..., shared=True)``), add the
    completion marker, then swap it into place as ``checkpoint-<step>`` (``utils.swap_folder_into_place``) and
    keep the newest ``total_limit`` complete checkpoints and every ``keep_every``-th
    (:func:`~.checkpoints.rotate_checkpoints`). Call on every process. An error removes the staging
    folder; a run killed before the swap leaves only a hidden folder that ``resolve_resume_checkpoint`` ignores
    and the next run removes."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    staged = stage_folder(final, shared=True) if accelerator.is_main_process else None
    try:
        accelerator.wait_for_everyone()
        staged = staged or shared_staging_path(final)
        accelerator.save_state(str(staged))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            mark_checkpoint_complete(staged, step, extra)
            swap_folder_into_place(staged, final)
            rotate_checkpoints(root, total_limit, keep_every)
    finally:
        if accelerator.is_main_process and staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------
# previews


@torch.no_grad()
def save_preview(vae: SphereVAE, images: torch.Tensor, path: str | os.PathLike,
                 autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Reconstruct ``images`` through the posterior mode and write a PNG (top row inputs, bottom row
    reconstructions) atomically. Returns the grid ``(3, H, W)`` in [0, 1]. Draws no random numbers."""
    from torchvision.utils import make_grid, save_image

    was_training = vae.training
    vae.eval()
    try:
        with autocast or contextlib.nullcontext():
            mode = vae.encode(images).latent_dist.mode()
            recon = vae.decode(mode).sample
    finally:
        vae.train(was_training)
    both = torch.cat([images.float(), recon.float()]).clamp(-1, 1) * 0.5 + 0.5
    grid = make_grid(both.cpu(), nrow=images.shape[0], padding=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        save_image(grid, f, format="PNG")
    return grid


# ---------------------------------------------------------------------------------------------------------------
# the run


def _tracker_config(*arg_objects: Any) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for obj in arg_objects:
        for key, value in asdict(obj).items():
            config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def _startup_summary(vae: nn.Module, discriminator: nn.Module, dataset: Any, max_steps: int,
                     steps_per_epoch: int | None, start_step: int, micro_bs: int, accum: int, world: int,
                     args: VAETrainingArguments, report_to: str | None) -> str:
    """A few lines on what the S-VAE run does: parameters, data, steps, the effective batch, where files go."""
    vae_params = sum(p.numel() for p in vae.parameters())
    disc_params = sum(p.numel() for p in discriminator.parameters())
    try:
        examples = f"{len(dataset):,} images"
    except TypeError:
        examples = "streamed images"
    epochs = f" ({max_steps / steps_per_epoch:g} epochs of {steps_per_epoch:,} steps)" if steps_per_epoch else ""
    start = f", resuming at step {start_step:,}" if start_step else ""
    limit, every = args.checkpoints_total_limit, args.keep_checkpoints_every
    kept = (f"the newest {limit}" if limit and limit > 0 else "all") + (f" and every {every}-th step" if every else "")
    logs = str(Path(args.output_dir) / "logs") if report_to else "off (--report_to none)"
    return "\n".join([
        "S-VAE training",
        f"  parameters: S-VAE {vae_params:,}, discriminator {disc_params:,}",
        f"  data:       {examples} at {vae.config.image_size}px",
        f"  steps:      {max_steps:,} optimizer steps{epochs}{start}",
        f"  batch:      {micro_bs} per device x {world} process{'es' if world != 1 else ''} x {accum} accumulation "
        f"= {micro_bs * world * accum} per step",
        f"  output:     {args.output_dir} (checkpoints every {args.checkpointing_steps:,} steps, keep {kept}; "
        f"TensorBoard logs: {logs})",
    ])


class LogMeter:
    """Per-key running means of logged values over a logging window (keys may appear mid-window).

    Tensors are summed as detached tensors where they live (no host read, so no GPU stall, per step); Python
    numbers (the learning rate) stay Python numbers. :meth:`mean_tensor` gives the window's means as one tensor,
    read once per logging interval."""

    def __init__(self) -> None:
        self.reset()

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        self.steps += 1
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean_tensor(self, device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor]:
        """The keys (sorted) and their means as one float32 tensor on ``device``."""
        keys = sorted(self.sums)
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float32).to(device).reshape(()) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float32).to(device)
        return keys, torch.stack(sums) / counts

    def means(self) -> dict[str, float]:
        keys, values = self.mean_tensor()
        return dict(zip(keys, values.tolist()))

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0


def train_vae(model_args: VAEModelArguments, training_args: VAETrainingArguments,
              data_args: DataArguments) -> Path:
    """Train the S-VAE and its discriminator; returns the saved ``output_dir/vae`` folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    check_arguments(model_args, training_args, data_args)
    for flag in ("pretrained_vae", "vae_config"):
        check_input_path(f"--{flag}", getattr(model_args, flag))
    args = training_args
    if args.mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"--mixed_precision {args.mixed_precision!r}: expected 'auto', 'no' or 'bf16'")
    if data_args.latent_cache:
        raise ValueError("the S-VAE trains on images; drop --latent_cache")
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in ("none", "", None) else args.report_to
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        kwargs_handlers=process_group_kwargs(args.ddp_timeout),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                        if accelerator.is_main_process else logging.WARNING)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    if int(os.environ.get("WORLD_SIZE", "1")) > world:
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate runs {world}: every "
                           "process would train alone and overwrite the same files (on CPU-only machines set "
                           "ACCELERATE_USE_CPU=true)")
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    per_step = world * args.gradient_accumulation_steps
    if args.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {args.global_batch_size} must be divisible by processes "
                         f"({world}) x gradient_accumulation_steps ({args.gradient_accumulation_steps})")
    micro_bs, accum = args.global_batch_size // per_step, args.gradient_accumulation_steps
    inputs = [model_args.pretrained_vae, *data_inputs(data_args)]
    finals = {"vae": output_dir / "vae", "discriminator": output_dir / "discriminator"}
    for final in finals.values():  # the final folders may replace only earlier ones; refuse before training
        check_output_folder(final, True, kind="model", inputs=inputs, option="--output_dir")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_staged_folders(output_dir, "checkpoint-*")  # left by a killed run
        with atomic_write(output_dir / "training_args.json", "w") as f:
            json.dump({"model": asdict(model_args), "training": asdict(args), "data": asdict(data_args)}, f, indent=2)

    # models, losses, optimizers
    set_seed(args.seed)
    vae = build_vae(model_args, data_args.resolution)
    if model_args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    discriminator = build_discriminator(model_args)
    loss_fn = SphereVAELoss(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, kl_weight=kl_weight(args, vae), disc_weight=args.disc_weight,
        disc_start=args.disc_start, disc_loss=args.disc_loss, gen_loss=args.gen_loss,
        lpips_pretrained_backbone=not args.lpips_random_backbone, lpips_dropout=args.lpips_dropout,
    ).to(device)
    model, paired = VAEWithPosterior(vae), PairedDiscriminator(discriminator)
    model.train()
    paired.train()
    loss_fn.train()
    adam = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    if device.type == "cuda":
        adam["fused"] = True
    opt_g = torch.optim.AdamW(official_param_groups(model, args.weight_decay), **adam)
    opt_d = torch.optim.AdamW(official_param_groups(paired, args.weight_decay), **adam)
    model, paired, opt_g, opt_d = accelerator.prepare(model, paired, opt_g, opt_d)
    disc_inner: nn.Module = accelerator.unwrap_model(paired).discriminator
    set_seed(args.seed, device_specific=True)  # per-process global RNG (LPIPS dropout)

    # data
    dataset = build_image_dataset(data_args, seed=args.seed, rank=rank, world_size=world)
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    sampler = None
    if streaming:
        if args.max_train_steps is None:
            raise ValueError("a streamed dataset has no known length: set --max_train_steps")
        steps_per_epoch = None
    else:
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        steps_per_epoch = sampler.num_samples // micro_bs // accum
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    preview = first_pixel_values(dataset, args.num_validation_images) if accelerator.is_main_process else None
    evaluation = _reconstruction_evaluation(dataset, args, output_dir, device) if (
        accelerator.is_main_process) else None

    state = _resume(accelerator, args, output_dir, accum, evaluation)
    last_saved = state.global_step if state.global_step else -1

    if report_to:
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(model_args, args, data_args))
    if accelerator.is_main_process:
        print(_startup_summary(vae, discriminator, dataset, max_steps, steps_per_epoch, state.global_step, micro_bs,
                               accum, world, args, report_to), file=sys.stderr, flush=True)

    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=state.global_step, desc="S-VAE", unit="step", dynamic_ncols=True,
                    disable=args.disable_tqdm or not accelerator.is_main_process)
    meter, t0 = LogMeter(), time.time()
    while state.global_step < max_steps:
        dataset.set_epoch(state.epoch)
        if sampler is not None:
            sampler.set_epoch(state.epoch)
            sampler.set_start_index(state.micro_batches_in_epoch * micro_bs)
        loader = DataLoader(dataset, batch_size=micro_bs, sampler=sampler, num_workers=args.dataloader_num_workers,
                            collate_fn=collate_images, drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed + state.epoch))
        batches = iter(loader)
        if streaming and state.micro_batches_in_epoch:
            logger.info("skipping %d streamed batches to the resume position", state.micro_batches_in_epoch)
            for _ in itertools.islice(batches, state.micro_batches_in_epoch):
                pass
        while state.global_step < max_steps:
            micro = list(itertools.islice(batches, accum))
            if len(micro) < accum:  # end of the epoch (an incomplete accumulation group is dropped)
                if state.micro_batches_in_epoch == 0:
                    raise RuntimeError("the dataset yielded no complete batch in an epoch")
                state.epoch += 1
                state.micro_batches_in_epoch = 0
                break
            logs = _train_step(accelerator, model, paired, disc_inner, loss_fn, opt_g, opt_d, micro, state, args,
                               max_steps)
            state.global_step += 1
            state.micro_batches_in_epoch += accum
            meter.add(logs)
            progress.update(1)
            step = state.global_step
            if step % args.logging_steps == 0 or step == max_steps:
                means = _log(accelerator, meter, step, time.time() - t0)
                progress.set_postfix({k: f"{means[k]:.4f}" for k in ("loss", "recon_loss") if k in means},
                                     refresh=False)
                meter.reset()
                t0 = time.time()
            if step % args.checkpointing_steps == 0 or step == max_steps:
                save_checkpoint_atomically(accelerator, output_dir, step, extra={"epoch": state.epoch},
                                           total_limit=args.checkpoints_total_limit,
                                           keep_every=args.keep_checkpoints_every)
                last_saved = step
            if accelerator.is_main_process and preview is not None and (
                    step % args.validation_steps == 0 or step == max_steps):
                _write_preview(accelerator, model, preview, output_dir / "previews" / f"step_{step:07d}.png", step)
            if evaluation is not None and (step % args.eval_steps == 0 or step == max_steps):
                _evaluate(accelerator, model, evaluation, step, state.epoch)

    progress.close()
    if last_saved != state.global_step:
        save_checkpoint_atomically(accelerator, output_dir, state.global_step, extra={"epoch": state.epoch},
                                   total_limit=args.checkpoints_total_limit, keep_every=args.keep_checkpoints_every)
    accelerator.wait_for_everyone()
    vae_dir = finals["vae"]
    refuse_non_finite(accelerator.unwrap_model(model).vae, "S-VAE")
    if accelerator.is_main_process:
        final_vae = accelerator.unwrap_model(model).vae
        written = {"vae": final_vae, "discriminator": disc_inner}
        for name, module in written.items():
            write_folder_atomically(finals[name], module.save_pretrained, overwrite=True, kind="model", inputs=inputs,
                                    option="--output_dir")
        logger.info("saved the S-VAE to %s", vae_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return vae_dir


def _train_step(accelerator: Any, model: nn.Module, paired: nn.Module, disc_inner: nn.Module,
                loss_fn: SphereVAELoss, opt_g: Any, opt_d: Any, micro: list[dict[str, torch.Tensor] | None],
                state: TrainState, args: VAETrainingArguments, max_steps: int) -> dict[str, Any]:
    """One official optimizer step (VAE, then discriminator) over ``len(micro)`` accumulated micro-batches."""
    device, accum = accelerator.device, len(micro)
    step = state.global_step + 1  # 1-based, as the official ``global_step`` of the adversarial weight
    lr = official_learning_rate(state.global_step, max_steps, args.learning_rate, args.min_lr, args.lr_warmup_steps,
                                args.lr_decay_start)
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    adv_on = loss_fn.adversarial_weight(step) > 0
    logs: dict[str, Any] = {}

    def add(values: dict[str, Any]) -> None:
        for k, v in values.items():
            logs[k] = logs.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) / accum

    opt_g.zero_grad(set_to_none=True)
    disc_inner.requires_grad_(False)  # the generator's adversarial term trains only the VAE
    cached = []
    for i, batch in enumerate(micro):
        if batch is None:
            raise RuntimeError("every image of a batch was undecodable; check the dataset")
        images = batch["pixel_values"].to(device, non_blocking=True)
        sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                gen = posterior_generator(args.seed, state.global_step, i, accelerator.process_index, device)
                recon, kl, spread = model(images, gen)
                out = loss_fn.generator_loss(images, recon, kl, step, disc_inner if adv_on else None)
            accelerator.backward(out.loss / accum)
        add({**out.logs(), **spread})
        cached.append((images, recon.detach()))
    disc_inner.requires_grad_(True)
    if args.max_grad_norm > 0:
        logs["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).detach().float()
    opt_g.step()

    opt_d.zero_grad(set_to_none=True)
    if adv_on:
        for i, (images, recon) in enumerate(cached):
            sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(paired)
            with sync:
                with accelerator.autocast():
                    logits_real, logits_fake = paired(images, recon)
                    d_loss = loss_fn.discriminator_loss(logits_real, logits_fake, step)
                accelerator.backward(d_loss / accum)
            add({"disc_loss": d_loss, "logits_real": logits_real.detach().float().mean(),
                 "logits_fake": logits_fake.detach().float().mean()})
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(paired.parameters(), args.max_grad_norm)
    else:
        # The official code backpropagates 0 * loss here: zero gradients, yet AdamW still steps (weight decay,
        # step count). Same result without running the discriminator.
        for p in paired.parameters():
            p.grad = torch.zeros_like(p)
        add({"disc_loss": 0.0})
    opt_d.step()
    logs["lr"] = lr
    return logs


def _log(accelerator: Any, meter: LogMeter, step: int, seconds: float) -> dict[str, float]:
    """Log the window's means (averaged over processes) to the trackers and the logger; returns them."""
    keys, local = meter.mean_tensor(accelerator.device)  # the same keys on every process (all take the same steps)
    values = accelerator.reduce(local, reduction="mean")
    logs = {f"train/{k}": float(v) for k, v in zip(keys, values.tolist())}  # the window's one host read
    logs["train/steps_per_sec"] = meter.steps / max(seconds, 1e-9)
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        logger.info("step %d: %s", step, ", ".join(f"{k[6:]} {v:.4f}" for k, v in logs.items()))
    return {k[6:]: v for k, v in logs.items()}


def _write_preview(accelerator: Any, model: nn.Module, images: torch.Tensor, path: Path, step: int) -> None:
    vae = accelerator.unwrap_model(model).vae
    grid = save_preview(vae, images.to(accelerator.device), path, accelerator.autocast())
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("previews/input_vs_reconstruction", grid, step)


def _reconstruction_evaluation(dataset: Any, args: VAETrainingArguments, output_dir: Path, device: torch.device
                               ) -> ReconstructionEvaluation | None:
    """The reconstruction evaluation of ``--eval_images`` / ``--eval_steps`` (main process), or ``None`` when off."""
    if args.eval_steps < 0:
        raise ValueError(f"--eval_steps {args.eval_steps}: expected an integer >= 0 (0: off)")
    if not args.eval_images and not args.eval_steps:
        return None
    if not (args.eval_images and args.eval_steps):
        raise ValueError(f"--eval_steps {args.eval_steps} and --eval_images {args.eval_images}: set both (> 0) or "
                         "neither")
    return ReconstructionEvaluation(dataset, args.eval_images, args.eval_features, output_dir / "eval",
                                    args.eval_inception_weights, "cuda" if device.type == "cuda" else "cpu")


def _evaluate(accelerator: Any, model: nn.Module, evaluation: ReconstructionEvaluation, step: int,
              epoch: int) -> None:
    vae = accelerator.unwrap_model(model).vae
    record, grid = evaluation(vae, step, epoch, accelerator.autocast)
    accelerator.log({f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch", "num_gen", "num_ref")
                     and isinstance(v, (int, float))}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("eval/originals_over_reconstructions", grid, step, dataformats="HWC")
    name = "frechet_distance" if "frechet_distance" in record else "fid"
    logger.info("reconstruction evaluation at step %d: %s %.4f over %d images (%.1f s)", step, name, record[name],
                record["num_images"], record["seconds"])


def _resume(accelerator: Any, args: VAETrainingArguments, output_dir: Path, accum: int,
            evaluation: ReconstructionEvaluation | None) -> TrainState:
    """The run's :class:`TrainState`, registered for checkpointing, loaded with the whole state from
    ``--resume_from_checkpoint`` if any (the evaluations after that checkpoint are then made again)."""
    world = accelerator.num_processes
    state = TrainState(global_batch_size=args.global_batch_size, num_processes=world,
                       gradient_accumulation_steps=accum)
    accelerator.register_for_checkpointing(state)
    path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if path is None:
        return state
    accelerator.load_state(path)
    saved = (state.global_batch_size, state.num_processes, state.gradient_accumulation_steps)
    if saved != (args.global_batch_size, world, accum):
        logger.warning("checkpoint geometry (global batch, processes, accumulation) %s differs from %s: the data "
                       "order after resuming differs from an uninterrupted run", saved, (args.global_batch_size, world,
                                                                                        accum))
        state.global_batch_size, state.num_processes, state.gradient_accumulation_steps = (
            args.global_batch_size, world, accum)
    logger.info("resumed from %s at step %d (epoch %d)", path, state.global_step, state.epoch)
    if evaluation is not None:
        evaluation.log.keep_until(state.global_step)
    return state
