"""Images made in batches without depending on their batch: each pipeline call is padded to a multiple of
:data:`ROW_QUANTUM` images.

With one generator per image the pipeline draws an image's noise from its own generator, but the arithmetic is
shared: a float32 matrix product on the CPU can round a row differently depending on how many rows it has (MKL
takes other kernels, and splits the work differently across threads, for a few rows). With the row count a multiple
of 16 (8 images, both halves of classifier-free guidance) each row gets the same bits whatever the other rows and the
thread count (measured for 1 to 48 images per batch and 1 and 2 threads, on the digits model and on SphereAR-B), so
an image made alone equals, bit for bit, the same image made in a batch of 7. The padding images are computed and
dropped. On GPUs the libraries choose kernels per shape, so images made with different batch sizes can differ in the
last bits.

The one batching rule of ``sphere-ar generate``, ``sphere-ar sample`` (:func:`.evaluation.sampling.sample_images`)
and the demo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .pipeline_sphere_ar import SphereARPipeline

__all__ = ["ROW_QUANTUM", "generate_padded", "padded_batches", "padded_size"]

ROW_QUANTUM = 8  # images per pipeline call are padded to a multiple of this (see the module docstring)


def padded_size(count: int) -> int:
    """The images of the pipeline call that makes ``count`` images: ``count`` rounded up to :data:`ROW_QUANTUM`."""
    return count + -count % ROW_QUANTUM


def padded_batches(pipe: SphereARPipeline, labels: Sequence[int | str], generators: Sequence[torch.Generator],
                   batch_size: int, *, on_batch: Callable[[int, int], Any] | None = None, **call_kwargs
                   ) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, images)`` for ``labels[start:start + batch_size]``, one batch at a time, each made by one
    pipeline call padded to a multiple of :data:`ROW_QUANTUM` images (the padding repeats the batch's last label
    with a generator seeded 0, and is dropped).

    Args:
        pipe: a :class:`.SphereARPipeline`.
        labels: one class label (id or name) per image.
        generators: one ``torch.Generator`` per image (e.g. :func:`.seeding.image_generators`).
        batch_size: images per call before padding.
        on_batch: called as ``on_batch(index, count)`` before batch ``index`` of ``count`` is made.
        call_kwargs: the pipeline's other arguments (``guidance_scale``, ``num_inference_steps``, ``output_type``,
            ...); ``images`` are of ``output_type`` (a list of PIL images, an array or a tensor).
    """
    labels, generators = list(labels), list(generators)
    if len(generators) != len(labels):
        raise ValueError(f"got {len(generators)} generators for {len(labels)} labels: pass one generator per image")
    if not labels:
        raise ValueError("labels: got none; pass at least one class label")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    starts = range(0, len(labels), batch_size)
    for index, start in enumerate(starts):
        batch, batch_generators = labels[start:start + batch_size], generators[start:start + batch_size]
        pad = padded_size(len(batch)) - len(batch)
        batch_generators += [torch.Generator().manual_seed(0) for _ in range(pad)]
        if on_batch is not None:
            on_batch(index, len(starts))
        images = pipe(batch + batch[-1:] * pad, generator=batch_generators, **call_kwargs).images
        yield start, images[:len(batch)]


def generate_padded(pipe: SphereARPipeline, labels: Sequence[int | str], generators: Sequence[torch.Generator],
                    batch_size: int, **call_kwargs) -> list | np.ndarray | torch.Tensor:
    """All images of :func:`padded_batches`, in order: a list of PIL images for ``output_type="pil"`` (the
    default), else one array (``"np"``) or tensor (``"pt"``, ``"latent"``)."""
    parts = [images for _, images in padded_batches(pipe, labels, generators, batch_size, **call_kwargs)]
    output_type = call_kwargs.get("output_type", "pil")
    if output_type == "pil":
        return [image for images in parts for image in images]
    return np.concatenate(parts) if output_type == "np" else torch.cat(parts)
