"""Training utilities: data loading and augmentation, the latent cache, EMA, the AR Trainer, the S-VAE trainer."""

from .arguments import ModelArguments, SphereARTrainingArguments
from .checkpoints import resolve_resume_checkpoint
from .data import (
    DataArguments,
    ImageDataset,
    IterableImageDataset,
    aug_ratio_at,
    build_image_dataset,
    class_names,
    collate_images,
    load_image_dataset,
)
from .ema import EMACallback, ParameterEMA
from .latent_cache import CacheArguments, LatentCacheDataset, cache_latents, load_latent_cache_info, load_vae
from .losses import PatchGANDiscriminator, PerceptualLoss, SphereVAELoss
from .trainer import SphereARTrainer, train_sphere_ar
from .vae_trainer import VAEModelArguments, VAETrainingArguments, train_vae

__all__ = [
    "CacheArguments",
    "EMACallback",
    "ModelArguments",
    "ParameterEMA",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "SphereVAELoss",
    "VAEModelArguments",
    "VAETrainingArguments",
    "SphereARTrainer",
    "SphereARTrainingArguments",
    "DataArguments",
    "ImageDataset",
    "IterableImageDataset",
    "LatentCacheDataset",
    "aug_ratio_at",
    "build_image_dataset",
    "cache_latents",
    "class_names",
    "collate_images",
    "load_image_dataset",
    "load_latent_cache_info",
    "load_vae",
    "resolve_resume_checkpoint",
    "train_sphere_ar",
    "train_vae",
]
