"""Training utilities: data loading and augmentation, the latent cache, EMA, the AR Trainer, the S-VAE trainer.

The public names load on first use (as the package's own do), so that a light module (``training.ema``,
``training.optimization``) imports without the ``train`` extra's packages (``datasets``, ``lpips``, ``peft``) and
without the seconds the Trainer's imports take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

# public name -> the module (in this package) that defines it
_EXPORTS: dict[str, str] = {
    "ModelArguments": "arguments",
    "SphereARTrainingArguments": "arguments",
    "resolve_resume_checkpoint": "checkpoints",
    "DataArguments": "data",
    "ImageDataset": "data",
    "IterableImageDataset": "data",
    "aug_ratio_at": "data",
    "build_image_dataset": "data",
    "class_names": "data",
    "collate_images": "data",
    "load_image_dataset": "data",
    "EMACallback": "ema",
    "ParameterEMA": "ema",
    "CacheArguments": "latent_cache",
    "LatentCacheDataset": "latent_cache",
    "cache_latents": "latent_cache",
    "load_latent_cache_info": "latent_cache",
    "load_vae": "latent_cache",
    "PatchGANDiscriminator": "losses",
    "PerceptualLoss": "losses",
    "SphereVAELoss": "losses",
    "SphereARTrainer": "trainer",
    "train_sphere_ar": "trainer",
    "VAEModelArguments": "vae_trainer",
    "VAETrainingArguments": "vae_trainer",
    "train_vae": "vae_trainer",
}

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

if TYPE_CHECKING:
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
