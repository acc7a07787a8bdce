"""Per-image seeds: image ``n`` of a request with seed ``S`` gets its own generator, seeded from a hash of ``(S, n)``.

One rule for every tool (``sphere-ar generate``, ``sphere-ar sample``, the demo): a SplitMix64 hash, so the seeds
of ``(S, n + 1)`` and ``(S + 1, n)`` do not collide, and bumping the seed gives new images, not shifted repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .options import MAX_SEED

__all__ = ["MAX_SEED", "image_generators", "image_seeds", "stream_hash"]

NOISE_STREAM, LABEL_STREAM = 0, 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64), elementwise with wrapping arithmetic."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_hash(seed: int, stream: int, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """A uint64 hash of ``(seed, stream, n)`` for each index ``n`` (``stream`` separates noise from labels)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    n = np.asarray(indices, dtype=np.int64)
    if n.size and n.min() < 0:
        raise ValueError("image indices must be >= 0")
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) + np.uint64(stream))
        return _splitmix64(key + n.astype(np.uint64))


def image_seeds(seed: int, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """The generator seed (uint64) of each image index of a request with ``seed``."""
    return stream_hash(seed, NOISE_STREAM, indices)


def image_generators(seed: int, indices: np.ndarray | Sequence[int] | int) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image index (``indices`` or ``range(indices)``), seeded by :func:`image_seeds`.

    Noise drawn on the CPU, so an image does not depend on the device's random number generator either.
    """
    if isinstance(indices, int):
        indices = range(indices)
    return [torch.Generator().manual_seed(int(s)) for s in image_seeds(seed, list(indices))]
