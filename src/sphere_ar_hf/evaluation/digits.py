"""The bundled ``digits`` model's data and yardstick: scikit-learn's 8x8 digits, a seeded held-out split, a small
digit classifier and the Fréchet distance in its feature space.

Shared by ``examples/train_digits.py`` (the recipe that trains the bundled model), ``benchmarks/eval_digits.py``
(its quality numbers) and ``tests/test_digits.py``. Needs scikit-learn (the ``[train]`` / ``[test]`` extras),
imported only when a function here needs it; the bundled model itself does not.

Images: the 8x8 digits (pixel values 0..16) are upscaled bilinearly to ``size`` x ``size``, scaled to [-1, 1]
(-1 is the black background) and replicated to RGB for the S-VAE. The classifier sees one gray channel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_ID2LABEL",
    "DIGITS_IMAGE_SIZE",
    "DigitClassifier",
    "DigitFeatures",
    "DigitSplits",
    "bundled_digits_path",
    "generate_digits",
    "load_digit_splits",
    "reference_images",
    "to_gray",
    "upscale_digits",
    "write_digits_dataset",
]

DIGITS_IMAGE_SIZE = 16
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_ID2LABEL = {i: f"{name}, {i}" for i, name in enumerate(_DIGIT_NAMES)}  # "seven" and "7" both name 7
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass
class DigitSplits:
    """The seeded stratified split: ``*_images`` (N, 8, 8) float32 in 0..16, ``*_labels`` (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digit_splits(seed: int = DIGITS_SPLIT_SEED, test_fraction: float = DIGITS_TEST_FRACTION) -> DigitSplits:
    """scikit-learn's 1,797 digits with a stratified ``test_fraction`` held out (seeded; no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                              stratify=labels)
    return DigitSplits(tr_x, tr_y, te_x, te_y)


def upscale_digits(images: np.ndarray, size: int = DIGITS_IMAGE_SIZE) -> np.ndarray:
    """(N, 8, 8) digits in 0..16 -> (N, size, size) float32 in [-1, 1], bilinear (deterministic)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 16.0 * 2.0 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(-1, 1).numpy()


def to_uint8_rgb(gray: np.ndarray) -> np.ndarray:
    """(N, H, W) gray in [-1, 1] -> uint8 (N, H, W, 3), as a generated image is stored (``evaluation.to_uint8``)."""
    pixels = np.floor((np.asarray(gray, dtype=np.float32) + 1.0) / 2.0 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1)


def reference_images(size: int = DIGITS_IMAGE_SIZE, split: str = "test") -> np.ndarray:
    """The real digits of the held-out ``"test"`` (or the ``"train"``) split at ``size`` px, uint8 (N, H, W, 3): the
    reference of ``sphere-ar evaluate --features digits``."""
    splits = load_digit_splits()
    images = {"test": splits.test_images, "train": splits.train_images}[split]
    return to_uint8_rgb(upscale_digits(images, size))


def to_gray(images: Any, size: int = DIGITS_IMAGE_SIZE) -> np.ndarray:
    """Images -> (N, size, size) float32 gray in [-1, 1] (the classifier's input).

    Accepts PIL images (a list), NHWC arrays in [0, 1] (``output_type="np"``) or uint8 (an ADM ``.npz``), NCHW tensors
    in [0, 1]
    (``output_type="pt"``), or (N, H, W) gray arrays already in [-1, 1]. Other sizes are resized (area / bilinear).
    """
    if isinstance(images, (list, tuple)):
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
        x = x.permute(0, 3, 1, 2).mean(1, keepdim=True) * 2 - 1
    elif isinstance(images, torch.Tensor):
        x = images.detach().float().cpu().mean(1, keepdim=True) * 2 - 1
    else:
        arr = np.asarray(images)
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
        if arr.ndim == 3:  # already gray in [-1, 1]
            x = torch.from_numpy(arr)[:, None]
        else:
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).mean(1, keepdim=True) * 2 - 1
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    elif x.shape[-1] < size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(-1, 1).numpy()


def write_digits_dataset(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                         size: int = DIGITS_IMAGE_SIZE) -> Path:
    """Write digits (N, 8, 8) in 0..16 as a ``save_to_disk`` dataset of ``size``-px RGB PNGs with a ClassLabel
    ``label`` ("0".."9"), readable by ``DataArguments(dataset_path=path)``."""
    import datasets
    from PIL import Image

    gray = upscale_digits(images, size)
    pixels = np.rint((gray + 1.0) / 2.0 * 255.0).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[DIGITS_ID2LABEL[i] for i in range(10)])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.repeat(p[..., None], 3, axis=-1)) for p in pixels],
         "label": [int(y) for y in labels]}, features=features)
    ds.save_to_disk(str(path))
    return Path(path)


class DigitClassifier:
    """A small MLP (scikit-learn) on gray ``size`` x ``size`` digits; its last hidden layer is the feature space of
    the Fréchet distance. Deterministic for a given ``seed`` (trains in seconds on the train split)."""

    def __init__(self, size: int = DIGITS_IMAGE_SIZE, hidden: tuple[int, ...] = (128, 64), seed: int = 0,
                 max_iter: int = 300, blas_threads: int | None = 1):
        from sklearn.neural_network import MLPClassifier

        self.size = size
        # one BLAS thread by default: on a busy machine several spin-wait badly (10x+ slower), and one is plenty here
        self.blas_threads = blas_threads
        self.mlp = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-3, max_iter=max_iter, random_state=seed,
                                 early_stopping=False, tol=1e-5)

    def flatten(self, images: Any) -> np.ndarray:
        """Grayscale images at ``size``, one flat row each (N, size * size)."""
        return to_gray(images, self.size).reshape(-1, self.size * self.size)

    def fit(self, images: Any, labels: np.ndarray) -> DigitClassifier:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(), self.blas_limits():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp.fit(self.flatten(images), np.asarray(labels))
        return self

    def blas_limits(self):
        """A context limiting BLAS to ``blas_threads`` threads."""
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        return threadpool_limits(self.blas_threads)

    @classmethod
    def fit_real(cls, splits: DigitSplits, size: int = DIGITS_IMAGE_SIZE, seed: int = 0) -> DigitClassifier:
        """Train on the real train split, upscaled to ``size``."""
        return cls(size=size, seed=seed).fit(upscale_digits(splits.train_images, size), splits.train_labels)

    def predict(self, images: Any) -> np.ndarray:
        with self.blas_limits():
            return self.mlp.predict(self.flatten(images))

    def probabilities(self, images: Any) -> np.ndarray:
        """Class probabilities (N, classes)."""
        with self.blas_limits():
            return self.mlp.predict_proba(self.flatten(images))

    def accuracy(self, images: Any, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images: Any) -> np.ndarray:
        """The last hidden layer's (ReLU) activations, (N, hidden[-1]) float64."""
        h = self.flatten(images).astype(np.float64)
        with self.blas_limits():
            for w, b in zip(self.mlp.coefs_[:-1], self.mlp.intercepts_[:-1]):
                h = np.maximum(h @ w + b, 0.0)
        return h


class DigitFeatures:
    """``extractor(images)`` -> ``{"features", "probabilities", "predictions"}`` of a :class:`DigitClassifier` for
    uint8 images (N, H, W, 3): the feature space of ``sphere-ar evaluate --features digits`` and
    ``benchmarks/eval_digits.py``. Without ``classifier``, one is trained on the real train split at ``size``."""

    def __init__(self, size: int = DIGITS_IMAGE_SIZE, classifier: DigitClassifier | None = None):
        self.classifier = classifier or DigitClassifier.fit_real(load_digit_splits(), size=size)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        gray = to_gray(images, self.classifier.size)
        clf = self.classifier
        probabilities = clf.probabilities(gray)
        return {"features": clf.features(gray), "probabilities": probabilities,
                "predictions": clf.mlp.classes_[probabilities.argmax(axis=1)]}


# ---------------------------------------------------------------------------------------------------------------
# sampling and evaluation


def bundled_digits_path() -> Path:
    """The folder of the bundled digits pipeline (package data)."""
    from ..pretrained import bundled_model_path

    return bundled_model_path("digits")


def generate_digits(pipe: Any, n_per_class: int, guidance_scale: float | None = None, num_inference_steps: int = 100,
                    seed: int = 0, batch_size: int = 500, classes: Sequence[int] = tuple(range(10))
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """``n_per_class`` images of each class (class-major order) as NHWC float arrays in [0, 1].

    Batch ``b`` uses one generator seeded ``seed + b`` (one generator per batch is much faster than one per image).
    Returns ``(images, labels, seconds)``.
    """
    labels = np.repeat(np.asarray(classes, dtype=np.int64), n_per_class)
    out, start = [], time.perf_counter()
    for b, i in enumerate(range(0, len(labels), batch_size)):
        generator = torch.Generator().manual_seed(seed + b)
        out.append(pipe(labels[i:i + batch_size].tolist(), guidance_scale=guidance_scale,
                        num_inference_steps=num_inference_steps, generator=generator, output_type="np").images)
    return np.concatenate(out), labels, time.perf_counter() - start
