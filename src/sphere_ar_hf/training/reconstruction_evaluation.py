"""The S-VAE trainer's view of quality while it trains: the reconstruction Fréchet distance of fixed images.

Every ``--eval_steps`` steps (and at the last one) the main process reconstructs the first ``--eval_images``
decodable images of epoch 0 through the posterior mode (no random draw) and measures the reconstructions against
the originals (:class:`~.evaluation_log.ImageMetric`: digits or Inception features); the record, with a grid of
the first originals over their reconstructions, goes to ``<output_dir>/eval/`` (:class:`~.evaluation_log.EvaluationLog`,
continued on resume) and its numbers to the trackers.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..evaluation.image_sets import ImageSet
from ..evaluation.sampling import to_uint8
from .evaluation_log import EvaluationLog, ImageMetric, image_grid

__all__ = ["ReconstructionEvaluation", "first_pixel_values", "to_uint8_images"]

GRID_COLUMNS = 8  # originals in the grid's first row(s), their reconstructions below


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """NCHW images in [-1, 1] -> uint8 NHWC (:func:`.evaluation.sampling.to_uint8`'s rounding)."""
    return to_uint8(pixels.float().clamp(-1, 1).add(1).div(2))


def first_pixel_values(dataset: Any, count: int) -> torch.Tensor | None:
    """The first ``count`` decodable images of epoch 0 (``pixel_values`` in [-1, 1], stacked), fixed for the whole
    run and its resumes; ``None`` when ``count`` is 0 or nothing decodes."""
    if count <= 0:
        return None
    dataset.set_epoch(0)
    source: Iterable[Any] = iter(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else (
        dataset[i] for i in range(len(dataset)))
    items = [item["pixel_values"] for item in itertools.islice((x for x in source if x is not None), count)]
    return torch.stack(items) if items else None


class ReconstructionEvaluation:
    """Reconstruction metrics of ``num_images`` fixed images of ``dataset``, logged under ``folder``."""

    def __init__(self, dataset: Any, num_images: int, features: str, folder: Any,
                 inception_weights: str | None = None, device: str = "cpu", batch_size: int = 32):
        if num_images < 2:
            raise ValueError(f"--eval_images: must be 0 (off) or at least 2 (a covariance needs 2), got {num_images}")
        pixels = first_pixel_values(dataset, num_images)
        if pixels is None or len(pixels) < 2:
            raise ValueError(f"--eval_images {num_images}: the dataset has {0 if pixels is None else len(pixels)} "
                             "decodable image(s); at least 2 are needed")
        self.originals = to_uint8_images(pixels)
        reference = ImageSet.from_arrays(self.originals, name="the originals")
        self.metric = ImageMetric(features, reference, inception_weights, device)
        self.log = EvaluationLog(folder)
        self.batch_size = batch_size

    @torch.no_grad()
    def reconstruct(self, vae: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                    ) -> np.ndarray:
        """The originals through ``vae``'s posterior mode and decoder (uint8 NHWC), in eval mode; ``autocast``
        makes each batch's autocast context (e.g. ``accelerator.autocast``)."""
        was_training = vae.training
        vae.eval()
        out = []
        try:
            for i in range(0, len(self.originals), self.batch_size):
                x = torch.from_numpy(self.originals[i:i + self.batch_size]).permute(0, 3, 1, 2).float()
                x = (x / 127.5 - 1).to(vae.device)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
                out.append(to_uint8_images(recon))
        finally:
            vae.train(was_training)
        return np.concatenate(out)

    def __call__(self, vae: torch.nn.Module, step: int, epoch: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                 ) -> tuple[dict[str, Any], np.ndarray]:
        """Reconstruct, measure and record at ``step``; returns the record and its grid (uint8 HWC)."""
        t0 = time.perf_counter()
        recon = self.reconstruct(vae, autocast)
        metrics = self.metric(recon, name=f"reconstructions at step {step}")
        shown = min(GRID_COLUMNS, len(recon))
        pairs = np.concatenate([self.originals[:shown], recon[:shown]])
        record = self.log.append({"step": step, "epoch": epoch, **metrics, "num_images": len(recon),
                                  "seconds": round(time.perf_counter() - t0, 3)}, pairs, columns=shown)
        return record, image_grid(pairs, shown)
