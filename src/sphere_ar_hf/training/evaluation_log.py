"""Quality while a run trains: the record of its evaluations and the metric they compute.

:class:`EvaluationLog` keeps ``<run>/eval/metrics.jsonl`` (one JSON object per evaluation, with its ``step``) and
``<run>/eval/step-<step>.png`` (the evaluated images as a grid). A resumed run first drops the records of steps
after the checkpoint it resumes from (:meth:`EvaluationLog.keep_until`), so that the curve continues without a
duplicate or a gap; every write is a whole-file rewrite under a temporary name, then a rename.

:class:`ImageMetric` computes what ``sphere-ar evaluate`` computes for a set of images held in memory: in the
digits feature space (Fréchet distance, classifier accuracy, precision, recall) or in Inception space (FID, sFID
where the reference stores spatial statistics, Inception Score) against a reference computed once per run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.evaluate import evaluate, evaluate_digits, extract_features
from ..evaluation.image_sets import ImageSet
from ..evaluation.metrics import feature_statistics
from ..options import FEATURE_SPACES
from ..utils import atomic_write

__all__ = ["EvaluationLog", "ImageMetric", "image_grid"]

METRICS_NAME = "metrics.jsonl"


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` tiled into one uint8 ``(rows x H, columns x W, 3)`` image (white padding)."""
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[y:y + h, x:x + w] = image
    return grid


class EvaluationLog:
    """``folder/metrics.jsonl`` and the grids of a run's evaluations (written by the main process only)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / METRICS_NAME

    def records(self) -> list[dict[str, Any]]:
        """The stored records, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _write(self, records: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)

    def keep_until(self, step: int) -> None:
        """Drop the records (and grids) of steps after ``step``: what a killed run evaluated after the checkpoint it
        resumes from, which the resumed run evaluates again."""
        records = self.records()
        kept = [r for r in records if r["step"] <= step]
        if len(kept) != len(records):
            self._write(kept)
            for r in records[len(kept):]:
                if r.get("grid"):
                    (self.folder / r["grid"]).unlink(missing_ok=True)

    def append(self, record: dict[str, Any], images: np.ndarray | None = None, columns: int | None = None
               ) -> dict[str, Any]:
        """Add ``record`` (it must hold ``step``), with ``images`` saved as its grid (``columns`` wide: default
        square); returns the stored record."""
        record = dict(record)
        if images is not None and len(images):
            from PIL import Image

            name = f"step-{int(record['step']):08d}.png"
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / name) as f:
                Image.fromarray(image_grid(images, columns)).save(f, format="PNG")
            record["grid"] = name
        self._write([r for r in self.records() if r["step"] != record["step"]] + [record])
        return record


class ImageMetric:
    """The metrics of uint8 images ``(N, H, W, 3)`` (with their labels) against a fixed reference.

    Args:
        features: ``"digits"`` or ``"inception"`` (as ``sphere-ar evaluate --features``).
        reference: an ``.npz`` / image folder; digits: default the held-out real digits; Inception: required (its
            stored ``mu`` / ``sigma`` are used, or its images' statistics, computed on the first call).
        inception_weights, device: as ``sphere-ar evaluate``.
    """

    def __init__(self, features: str, reference: str | os.PathLike | ImageSet | None = None,
                 inception_weights: str | os.PathLike | None = None, device: str = "cpu"):
        if features not in FEATURE_SPACES:
            raise ValueError(f"eval_features must be one of {FEATURE_SPACES}, got {features!r}")
        if features == "inception" and reference is None:
            raise ValueError("eval_reference is required with eval_features='inception' (an ADM reference batch such "
                             "as VIRTUAL_imagenet256_labeled.npz, or a folder of real images)")
        self.features, self.inception_weights, self.device = features, inception_weights, device
        try:
            self.reference = reference if reference is None or isinstance(reference, ImageSet) else ImageSet(reference)
        except FileNotFoundError:
            raise ValueError(f"eval_reference {reference}: no such file or folder") from None
        self.extractor = None  # digits: trained once, on the first call (it depends on the image size)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "samples") -> dict[str, Any]:
        generated = ImageSet.from_arrays(images, labels, name=name)
        if self.features == "digits":
            from ..evaluation.digits import DigitFeatures

            self.extractor = self.extractor or DigitFeatures(images.shape[1])
            out = evaluate_digits(generated, self.reference, extractor=self.extractor)
        else:
            out = evaluate(generated, self.reference_statistics(), features="inception",
                           inception_weights=self.inception_weights, device=self.device, with_precision_recall=False)
        return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def reference_statistics(self) -> ImageSet:
        """The Inception reference as a set of stored statistics (the images' are computed once)."""
        ref = self.reference
        if "mu" not in ref.statistics:
            from ..evaluation.inception import InceptionFeatures

            feats = extract_features(ref, InceptionFeatures(self.inception_weights, self.device))
            stats = ImageSet.from_arrays(np.zeros((0, *ref.image_shape), np.uint8), name=str(ref.path))
            stats.statistics = dict(zip(("mu", "sigma"), feature_statistics(feats["pool"])))
            stats.statistics.update(zip(("mu_s", "sigma_s"), feature_statistics(feats["spatial"])))
            self.reference = ref = stats
        return ref
