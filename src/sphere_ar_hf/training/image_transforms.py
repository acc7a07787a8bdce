"""Decoding training images, and the pieces of the official augmentation.

Images are decoded with PIL into RGB (transparency composited on white, 16-bit images rescaled). The augmentation
follows the official recipe: with probability ``aug_ratio`` a random crop whose short side is first resized to a
size drawn from ``[res, res / 0.8]``, otherwise the ADM center crop; then a random horizontal flip; pixels scaled
to [-1, 1]. Every draw comes from a numpy ``Generator`` of :func:`example_rng`, seeded from ``(seed, epoch,
index)``.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "MIN_CROP_FRAC",
    "center_crop",
    "decode_image",
    "describe_image_value",
    "example_rng",
    "pixels_to_tensor",
    "random_crop",
    "to_rgb",
    "transform_image",
]

# The official random crops: the short side is resized to a size in [res, res / MIN_CROP_FRAC] first.
MIN_CROP_FRAC = 0.8


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on white, 16-bit/float images are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        arr = np.asarray(image, dtype=np.float64)
        if arr.size and arr.max() > 255:
            arr = arr / 257.0  # 16-bit range to 8-bit
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any) -> Image.Image:
    """Decode an image value (``{"bytes", "path"}`` dict from ``Image(decode=False)``, bytes, path or PIL image)
    into a fully loaded RGB PIL image. Raises on undecodable data."""
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        elif isinstance(value, (str, os.PathLike)):
            data, path = None, value
        else:
            raise TypeError(f"cannot decode an image from {type(value).__name__}")
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path is not None:
            with open(path, "rb") as f:
                image = Image.open(io.BytesIO(f.read()))
        else:
            raise ValueError("image value has neither bytes nor path")
    image.load()
    return to_rgb(image)


def describe_image_value(value: Any) -> str:
    """A short description of an image value for messages: its path, its size in bytes, or its type."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes") is not None:
            return f"{len(value['bytes'])} bytes"
    return type(value).__name__


def _resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """ADM resizing: BOX-halve while the short side is >= 2x the target, then BICUBIC to the exact short side."""
    while min(image.size) >= 2 * short:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short / min(image.size)
    return image.resize(tuple(max(short, round(x * scale)) for x in image.size), resample=Image.BICUBIC)


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """The ADM center crop: ``(resolution, resolution, 3)`` uint8 array (smaller images are upscaled)."""
    arr = np.asarray(_resize_short_side(image, resolution))
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def random_crop(image: Image.Image, resolution: int, rng: np.random.Generator,
                min_crop_frac: float = MIN_CROP_FRAC) -> np.ndarray:
    """The official random crop: resize the short side to a size drawn from ``[res, res / min_crop_frac]``,
    then crop a uniformly placed ``(resolution, resolution, 3)`` uint8 window."""
    low, high = resolution, math.ceil(resolution / min_crop_frac)
    short = int(rng.integers(low, high + 1))
    arr = np.asarray(_resize_short_side(image, short))
    top = int(rng.integers(0, arr.shape[0] - resolution + 1))
    left = int(rng.integers(0, arr.shape[1] - resolution + 1))
    return arr[top:top + resolution, left:left + resolution]


def transform_image(image: Image.Image, resolution: int, rng: np.random.Generator, aug_ratio: float,
                    hflip: bool = True) -> torch.Tensor:
    """Crop (random with probability ``aug_ratio``, else center), maybe flip, scale to a (3, res, res) tensor in
    [-1, 1]. Draw order: crop choice, crop parameters, flip."""
    use_random = rng.random() < aug_ratio
    arr = random_crop(image, resolution, rng) if use_random else center_crop(image, resolution)
    if hflip and int(rng.integers(0, 2)) == 1:
        arr = arr[:, ::-1]
    return pixels_to_tensor(arr)


def pixels_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1]."""
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return torch.from_numpy((chw.astype(np.float32) / 255.0 - 0.5) * 2.0)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The numpy generator for one example of one epoch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))
