"""Sampling for evaluation: many images, reproducible per image, sharded, distributed and resumable.

Image ``n`` of a run with seed ``S`` depends only on ``(S, n)``, its label and the settings, never on the number
of processes, the batch size or its batch-mates:

- its noise comes from its own ``torch.Generator`` seeded with :func:`~sphere_ar_hf.seeding.image_seeds` (a
  SplitMix64 hash of ``S`` and ``n``: seeds of ``(S, n + 1)`` and ``(S + 1, n)`` do not collide), which the
  pipeline draws from for this image alone;
- its label is ``n % num_classes`` (``labels="balanced"``) or a hash of ``(S, n)`` modulo ``num_classes``
  (``"uniform"``, the official sampler's uniformly random labels, without its global RNG);
- every batch is padded to a multiple of :data:`ROW_QUANTUM` images (:mod:`sphere_ar_hf.batching`, the rule
  ``sphere-ar generate`` and the demo follow too): on the CPU each image gets the same bits whatever its
  batch-mates and the thread count. On GPUs the libraries choose kernels per shape, so images made with different
  batch sizes can differ in the last bits.

With ``fast_sampler`` (``pipe.enable_torch_compile()`` on) or ``vae_slicing`` (``pipe.vae.enable_slicing()``) the
images equal the default's to float rounding only, so a run records both among its settings.

A run writes ``DIR/sampling.json`` (the settings), then shards ``DIR/shards/{start}-{end}.npz`` of
``shard_size`` consecutive images, each written to a temporary name and renamed once complete, so that a crash
or ``kill -9`` loses at most the shards in progress and ``resume=True`` redoes only those. Shard ``j`` belongs to
rank ``j % world_size``. At the end rank 0 streams the shards into ``DIR/samples.npz`` (ADM layout: ``arr_0``
uint8 ``(N, H, W, 3)``, ``arr_1`` labels).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..batching import ROW_QUANTUM, padded_batches, padded_size
from ..options import LABEL_MODES
from ..seeding import LABEL_STREAM, image_seeds, stream_hash
from ..utils import atomic_write, remove_stale_temporaries
from .image_sets import write_npz

__all__ = ["LABEL_MODES", "ROW_QUANTUM", "SamplingSettings", "check_recorded_settings", "image_labels", "image_seeds",
           "run_sampling", "sample_images", "sampling_settings", "set_sampler", "to_uint8"]

def image_labels(seed: int, indices: np.ndarray | Sequence[int], num_classes: int, mode: str = "uniform"
                 ) -> np.ndarray:
    """The class label (int64) of each image index: ``"balanced"``: ``n % num_classes``; ``"uniform"``:
    uniformly random from a hash of ``(seed, n)``."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    n = np.asarray(indices, dtype=np.int64)
    if mode == "balanced":
        return n % num_classes
    return (stream_hash(seed, LABEL_STREAM, n) % np.uint64(num_classes)).astype(np.int64)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW images in [0, 1] -> uint8 NHWC, rounded (the official sampler's ``127.5 x + 128`` truncated)."""
    return images.mul(255).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(pipe, labels: np.ndarray | Sequence[int], seeds: np.ndarray | Sequence[int], batch_size: int = 32,
                  progress: Callable[[int], Any] | None = None, **call_kwargs) -> np.ndarray:
    """Images (uint8 NHWC) for ``labels`` with one generator per image seeded from ``seeds``, ``batch_size`` at a
    time, each batch padded to a multiple of :data:`ROW_QUANTUM` (:func:`.batching.padded_batches`).
    ``call_kwargs`` go to the pipeline (``guidance_scale``, ``cfg_schedule``, ``num_inference_steps``)."""
    labels, seeds = np.asarray(labels, dtype=np.int64), np.asarray(seeds, dtype=np.uint64)
    if labels.shape != seeds.shape or labels.ndim != 1:
        raise ValueError(f"labels and seeds must be 1-d of one length, got {labels.shape} and {seeds.shape}")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
    out = []
    for _, images in padded_batches(pipe, labels.tolist(), generators, batch_size, output_type="pt", **call_kwargs):
        out.append(to_uint8(images))  # each batch as uint8 at once: a shard's float images need not fit
        if progress is not None:
            progress(len(images))
    return np.concatenate(out)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything an image depends on (written to ``DIR/sampling.json``; a resumed run must match it)."""

    model: str
    num_images: int
    seed: int
    labels: str
    guidance_scale: float
    cfg_schedule: str
    sampler: str
    time_shift: float
    num_inference_steps: int
    dtype: str
    shard_size: int
    num_classes: int
    image_size: int
    fast_sampler: bool = False  # pipe.enable_torch_compile(): the same images up to float rounding, not bit for bit
    vae_slicing: bool = False  # pipe.vae.enable_slicing(): the same, up to float rounding

    def differences(self, other: dict) -> list[str]:
        """Each setting that differs from ``other`` (a recorded run's; a setting it lacks has its default)."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        return [f"{k}: {there!r} there, {v!r} now" for k, v in asdict(self).items()
                if (there := other.get(k, defaults.get(k))) != v]


def set_sampler(pipe, sampler: str | None = None, time_shift: float | None = None) -> None:
    """Give ``pipe`` a scheduler with ``sampler`` / ``time_shift`` (``None``: keep its own) unless it has them."""
    from ..scheduling_sphere_ar import SphereARScheduler

    config = pipe.scheduler.config
    overrides = {k: v for k, v in (("sampler", sampler), ("time_shift", time_shift))
                 if v is not None and v != config[k]}
    if overrides:
        pipe.scheduler = SphereARScheduler.from_config(config, **overrides)


def sampling_settings(pipe, model: str, num_images: int, seed: int, labels: str, guidance_scale: float,
                      cfg_schedule: str, num_inference_steps: int, dtype: str, shard_size: int,
                      fast_sampler: bool = False) -> SamplingSettings:
    """The :class:`SamplingSettings` of a run of ``pipe`` (its sampler, time shift, classes, image size and VAE
    slicing); ``fast_sampler``: the run samples with ``pipe.enable_torch_compile()`` on."""
    return SamplingSettings(
        model=model, num_images=num_images, seed=seed, labels=labels, guidance_scale=guidance_scale,
        cfg_schedule=cfg_schedule, sampler=pipe.scheduler.config.sampler,
        time_shift=float(pipe.scheduler.config.time_shift), num_inference_steps=num_inference_steps, dtype=dtype,
        shard_size=shard_size, num_classes=pipe.transformer.config.num_classes,
        image_size=pipe.vae.config.image_size, fast_sampler=fast_sampler, vae_slicing=bool(pipe.vae.use_slicing))


def _shard_path(output_dir: Path, start: int, end: int) -> Path:
    return output_dir / "shards" / f"{start:08d}-{end:08d}.npz"


def _save_pngs(output_dir: Path, start: int, images: np.ndarray) -> None:
    from PIL import Image

    for n, image in enumerate(images, start):
        with atomic_write(output_dir / "images" / f"{n:06d}.png") as f:
            Image.fromarray(image).save(f, format="PNG")


MAX_SHARDS = 1_000_000  # shard files per run (one per --shard-size images)


def check_sampling_size(output_dir: Path, settings: SamplingSettings) -> None:
    """Refuse, before anything is written, a run with more than :data:`MAX_SHARDS` shard files or whose shards and
    ``samples.npz`` (twice the uint8 images, less the shards already written) do not fit on the disk of
    ``output_dir``."""
    shards = -(-settings.num_images // settings.shard_size)
    if shards > MAX_SHARDS:
        raise ValueError(f"num_images {settings.num_images} in shards of {settings.shard_size} make {shards} shard "
                         f"files; at most {MAX_SHARDS}: use a shard size of "
                         f"{-(-settings.num_images // MAX_SHARDS)} or more")
    existing = next(p for p in (output_dir.resolve(), *output_dir.resolve().parents) if p.exists())
    written = sum(p.stat().st_size for p in (output_dir / "shards").glob("*.npz")) if existing == output_dir.resolve() \
        else 0  # a resumed run's shards are already on the disk
    need = 2 * settings.num_images * settings.image_size**2 * 3 - written
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ValueError(f"{settings.num_images} images of {settings.image_size}x{settings.image_size} need about "
                         f"{_size(need)} of disk in {output_dir} (the shards and samples.npz) but {_size(free)} is "
                         "free")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_recorded_settings(record: Path, differences: Callable[[dict], list[str]], resume: bool, what: str
                            ) -> bool:
    """Whether ``record`` (the settings file of an earlier run in its folder) exists; if so, refuse in one line
    unless ``resume`` and ``differences(recorded settings)`` is empty (each difference named)."""
    if not record.is_file():
        return False
    folder = record.parent
    if not resume:
        raise ValueError(f"{folder} already holds {what} ({record.name}): pass --resume to continue it, or choose "
                         "another folder")
    diffs = differences(json.loads(record.read_text()))
    if diffs:
        raise ValueError(f"{folder}: --resume with other settings than the run there: " + "; ".join(diffs))
    return True


def _prepare(output_dir: Path, settings: SamplingSettings, resume: bool) -> None:
    """Checks every rank makes (read-only but for a probe file), so that all fail alike instead of hanging."""
    try:
        (output_dir / "shards").mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{secrets.token_hex(4)}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"{output_dir}: cannot write samples there ({e.strerror})") from None
    for folder in (output_dir, output_dir / "shards", output_dir / "images"):  # what killed runs left half-written
        remove_stale_temporaries(folder)
    record = output_dir / "sampling.json"
    recorded = check_recorded_settings(record, settings.differences, resume, "a sampling run")
    if not recorded and ((output_dir / "samples.npz").exists() or any((output_dir / "shards").iterdir())):
        raise ValueError(f"{output_dir} holds samples without {record.name}: choose an empty folder")


def run_sampling(pipe, output_dir: str | os.PathLike, settings: SamplingSettings, batch_size: int = 32,
                 resume: bool = False, png: bool = False, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, show_progress: bool = True) -> Path:
    """Sample ``settings.num_images`` images into ``output_dir`` (see the module docstring); returns the path of
    ``samples.npz``. ``pipe`` must already carry the settings' sampler, dtype and device. With several processes
    each calls this with its ``rank``, and ``barrier`` synchronises them (e.g. ``torch.distributed.barrier``)."""
    output_dir = Path(output_dir)
    pipe.check_inputs(batch_size, settings.guidance_scale, settings.cfg_schedule, settings.num_inference_steps,
                      None, "np")  # before anything is recorded: a refused run leaves no sampling.json
    batch = min(batch_size, settings.num_images)
    pipe.check_memory(padded_size(batch), settings.num_inference_steps, settings.guidance_scale > 1.0, "pt",
                      pipe.device)  # the largest batch sample_images makes, before anything is written
    check_sampling_size(output_dir, settings)
    _prepare(output_dir, settings, resume)
    barrier()
    record = output_dir / "sampling.json"
    recorded_now = rank == 0 and not record.is_file()
    if recorded_now:
        with atomic_write(record, "w") as f:
            json.dump(asdict(settings), f, indent=1)
    try:
        return _sample(pipe, output_dir, settings, batch_size, png, rank, world_size, barrier, show_progress)
    except BaseException:  # a run refused before its first shard (e.g. a guidance that overflows) records nothing
        if recorded_now and not any((output_dir / "shards").iterdir()):
            record.unlink(missing_ok=True)
        raise


def _sample(pipe, output_dir: Path, settings: SamplingSettings, batch_size: int, png: bool, rank: int,
            world_size: int, barrier: Callable[[], None], show_progress: bool) -> Path:
    """:func:`run_sampling` once the run is recorded: this rank's shards, then (rank 0) the merge."""
    from tqdm.auto import tqdm

    if png:
        (output_dir / "images").mkdir(exist_ok=True)
    barrier()

    n, size = settings.num_images, settings.shard_size
    shards = [(s, min(s + size, n)) for s in range(0, n, size)]
    mine = shards[rank::world_size]
    todo = [(s, e) for s, e in mine if not _shard_path(output_dir, s, e).is_file()]
    call = dict(guidance_scale=settings.guidance_scale, cfg_schedule=settings.cfg_schedule,
                num_inference_steps=settings.num_inference_steps)
    done_before = sum(e - s for s, e in mine) - sum(e - s for s, e in todo)
    bar = tqdm(total=sum(e - s for s, e in mine), initial=done_before, unit="img", desc=f"rank {rank} sampling",
               disable=not show_progress or rank != 0, dynamic_ncols=True)
    def log(message: str) -> None:
        (bar.write if show_progress and rank == 0 else print)(message, file=sys.stderr)

    if done_before:
        log(f"rank {rank}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
    for j, (start, end) in enumerate(todo):
        t0 = time.perf_counter()
        indices = np.arange(start, end)
        labels = image_labels(settings.seed, indices, settings.num_classes, settings.labels)
        images = sample_images(pipe, labels, image_seeds(settings.seed, indices), batch_size, progress=bar.update,
                               **call)
        if png:
            _save_pngs(output_dir, start, images)
        with atomic_write(_shard_path(output_dir, start, end)) as f:
            np.savez(f, images=images, labels=labels)
        seconds = time.perf_counter() - t0
        log(f"rank {rank}: shard {j + 1}/{len(todo)} (images {start}-{end - 1}) in {seconds:.1f} s, "
            f"{(end - start) / seconds:.2f} images/s")
    bar.close()
    barrier()
    final = output_dir / "samples.npz"
    if rank == 0:
        missing = [f"{s}-{e - 1}" for s, e in shards if not _shard_path(output_dir, s, e).is_file()]
        if missing:
            raise RuntimeError(f"{output_dir}: shards missing after sampling: {', '.join(missing[:5])}")

        def parts():
            for s, e in shards:
                with np.load(_shard_path(output_dir, s, e)) as shard:
                    yield shard["images"], shard["labels"]

        write_npz(final, parts(), n, (settings.image_size, settings.image_size, 3))
    barrier()
    return final
