"""The S-VAE run's arguments (``HfArgumentParser``-ready): the architecture, and the optimisation, losses,
checkpointing and logging, with the official S-VAE recipe as defaults; and the KL weight of each posterior."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..options import POSTERIORS
from .checkpoints import DEFAULT_CHECKPOINT_LIMIT
from .device_setup import DEFAULT_DDP_TIMEOUT
from .losses import DISC_LOSSES, GEN_LOSSES, REC_LOSSES

if TYPE_CHECKING:
    from ..vae import SphereVAE

__all__ = [
    "DEFAULT_KL_WEIGHTS",
    "GAUSSIAN_KL_WEIGHT",
    "VAEModelArguments",
    "VAETrainingArguments",
    "kl_weight",
]

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


def kl_weight(args: VAETrainingArguments, vae: SphereVAE) -> float:
    """``args.kl_weight``, or the default of the VAE's posterior (:data:`DEFAULT_KL_WEIGHTS`)."""
    return DEFAULT_KL_WEIGHTS[vae.config.posterior] if args.kl_weight is None else args.kl_weight
