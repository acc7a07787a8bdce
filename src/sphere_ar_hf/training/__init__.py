"""Training utilities: data loading and augmentation, the latent cache."""

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
from .latent_cache import CacheArguments, LatentCacheDataset, cache_latents, load_latent_cache_info, load_vae

__all__ = [
    "CacheArguments",
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
]
