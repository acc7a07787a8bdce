"""Latent cache: encode a dataset's center crops once into SphereVAE posterior parameters, then train the AR model
on fresh posterior samples without running the VAE encoder.

The cache is a ``save_to_disk`` folder with, per image, the posterior's parameters of the center crop and of its
horizontal flip (float32): ``mu`` (L, d) and ``kappa`` (L,) for the Power Spherical posterior, ``mean`` and
``logvar`` (both (L, d)) for a Gaussian one, each also as ``<name>_flip``; ``class_labels`` (a ClassLabel when the
source has class names) and ``index`` (the row in the source dataset), plus ``latent_cache.json`` with the
posterior, the VAE config, latent_dim, the source's id2label and where the data came from.
:class:`LatentCacheDataset` reads it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from ..utils import atomic_write, check_output_folder, shared_staging_path, stage_folder, swap_folder_into_place
from ..vae import POSTERIOR_CLASSES, SphereVAE, posterior_tokens
from .argument_checks import check_arguments
from .data import DataArguments, class_names, load_image_dataset, resolve_num_classes, undecoded_images
from .device_setup import DEFAULT_DDP_TIMEOUT, check_one_job, process_group_kwargs
from .image_transforms import center_crop, decode_image, describe_image_value, pixels_to_tensor

__all__ = [
    "CACHE_INFO_FILE",
    "CacheArguments",
    "LatentCacheDataset",
    "cache_latents",
    "check_latent_cache",
    "data_inputs",
    "encode_posteriors",
    "load_latent_cache_info",
    "load_vae",
]

logger = logging.getLogger(__name__)

CACHE_INFO_FILE = "latent_cache.json"
CACHE_FORMAT_VERSION = 1


@dataclass
class CacheArguments:
    """How to encode the latent cache (``HfArgumentParser``-ready; the data come from :class:`DataArguments`)."""

    pretrained_vae: str = field(
        metadata={"help": "A SphereVAE folder (or Hub id), or a pipeline folder with a vae/ subfolder."}
    )
    output_dir: str = field(metadata={"help": "Where to write the cache (a datasets save_to_disk folder)."})
    batch_size: int = field(default=64, metadata={"help": "Images per encoder batch, per process."})
    mixed_precision: str = field(default="no", metadata={"help": "Encoder autocast: 'no', 'fp16' or 'bf16'."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers decoding images, per process."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even if an accelerator is available."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar (main process)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache at output_dir."})
    ddp_timeout: int = field(
        default=DEFAULT_DDP_TIMEOUT,
        metadata={"help": "Seconds a process waits at a collective (the slowest process's shard) before failing."})


def data_inputs(data_args: Any) -> list[str]:
    """The local paths a run reads its data from (``train_data_dir``, ``dataset_path``, ``latent_cache``,
    ``cache_dir``): the inputs that ``utils.check_output_folder`` keeps an output folder from replacing."""
    names = ("train_data_dir", "dataset_path", "latent_cache", "cache_dir")
    return [str(v) for n in names if (v := getattr(data_args, n, None))]


def load_vae(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> SphereVAE:
    """Load a :class:`SphereVAE` from its own folder, from a pipeline folder's ``vae/`` subfolder, or from the Hub
    (the repository root first, then its ``vae`` subfolder)."""
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    local = Path(path)
    if local.is_dir():
        if (local / "config.json").is_file():
            return SphereVAE.from_pretrained(str(local), **kwargs)
        if (local / "vae" / "config.json").is_file():
            return SphereVAE.from_pretrained(str(local), subfolder="vae", **kwargs)
        raise ValueError(f"{local} is neither a SphereVAE folder (config.json) nor a pipeline folder (vae/config.json)")
    try:
        return SphereVAE.from_pretrained(str(path), **kwargs)
    except OSError:
        return SphereVAE.from_pretrained(str(path), subfolder="vae", **kwargs)


@torch.no_grad()
def encode_posteriors(vae: SphereVAE, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posterior parameters of images ``(B, 3, H, W)`` and of their horizontal flips, as float32 CPU tensors:
    ``mu``/``mu_flip`` (B, L, d), ``kappa``/``kappa_flip`` (B, L) for the Power Spherical posterior;
    ``mean``/``logvar`` and their ``_flip`` (B, L, d) for a Gaussian one."""
    both = torch.cat([pixel_values, pixel_values.flip(-1)])
    params = vae.encode(both).latent_dist.parameters()
    b = pixel_values.shape[0]
    out = {}
    for name, value in params.items():
        value = value.float().cpu()
        out[name], out[name + "_flip"] = value[:b], value[b:]
    return out


class _CenterCropDataset(torch.utils.data.Dataset):
    """Center crops of a slice of the source dataset; None for an undecodable image."""

    def __init__(self, dataset: datasets.Dataset, args: DataArguments, offset: int):
        columns = dataset.select_columns([args.image_column, args.label_column])
        self.dataset = undecoded_images(columns, args.image_column)
        self.args, self.offset = args, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        row = self.dataset[int(i)]
        index = self.offset + int(i)
        try:
            image = decode_image(row[self.args.image_column])
        except Exception as err:  # skipped and counted, never a crash
            logger.warning("skipping undecodable image (example %d, %s): %s: %s", index,
                           describe_image_value(row[self.args.image_column]), type(err).__name__, err)
            return None
        return {"pixel_values": pixels_to_tensor(center_crop(image, self.args.resolution)),
                "class_labels": int(row[self.args.label_column]), "index": index}


def _collate(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    items = [item for item in batch if item is not None]
    out: dict[str, Any] = {"num_skipped": len(batch) - len(items)}
    if items:
        out["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
        out["class_labels"] = np.array([item["class_labels"] for item in items], dtype=np.int64)
        out["index"] = np.array([item["index"] for item in items], dtype=np.int64)
    return out


def _cache_features(num_tokens: int, latent_dim: int, id2label: dict[int, str] | None,
                    posterior: str = "power_spherical") -> datasets.Features:
    label = datasets.ClassLabel(names=[id2label[i] for i in range(len(id2label))]) if id2label else \
        datasets.Value("int64")
    per_token = datasets.Array2D((num_tokens, latent_dim), "float32")
    if posterior == "power_spherical":
        params = {"mu": per_token, "kappa": datasets.List(datasets.Value("float32"), length=num_tokens)}
    else:
        params = {"mean": per_token, "logvar": per_token}
    flipped = {name + "_flip": feature for name, feature in params.items()}
    return datasets.Features({**params, **flipped, "class_labels": label, "index": datasets.Value("int64")})


def _shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, balanced shard ``[start, end)`` of ``n`` rows for ``rank``."""
    div, mod = divmod(n, world_size)
    start = rank * div + min(rank, mod)
    return start, start + div + (1 if rank < mod else 0)


def _cache_info(vae: SphereVAE, data_args: DataArguments, num_classes: int | None,
                id2label: dict[int, str] | None, stats: list[dict[str, int]]) -> dict[str, Any]:
    """The cache's ``latent_cache.json``, from the per-process counts ``stats``."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "posterior": vae.config.posterior,
        "latent_dim": vae.config.latent_dim,
        "num_tokens": vae.num_tokens,
        "image_size": vae.config.image_size,
        "num_classes": num_classes,
        "id2label": {str(k): v for k, v in id2label.items()} if id2label else None,
        "num_examples": sum(s["written"] for s in stats),
        "num_skipped": sum(s["skipped"] for s in stats),
        "dtype": "float32",
        "crop": "center",
        "vae_config": json.loads(vae.to_json_string()),
        "source": {k: v for k, v in asdict(data_args).items() if k not in ("latent_cache", "cache_dir")},
    }


def shard_file_name(rank: int, world_size: int) -> str:
    """The Arrow file of process ``rank``'s rows, named as ``Dataset.save_to_disk`` names its shards."""
    return f"data-{rank:05d}-of-{world_size:05d}.arrow"


def write_shard_index(folder: Path, world_size: int, features: datasets.Features, description: str) -> None:
    """Make ``folder``, which holds the Arrow files :func:`shard_file_name` of ``world_size`` processes, a
    ``save_to_disk`` folder: ``state.json`` lists the files in rank order, ``dataset_info.json`` holds the features
    and ``description``. No shard is opened, so no process ever holds the whole cache."""
    datasets.DatasetInfo(description=description, features=features).write_to_directory(str(folder))
    state = {"_data_files": [{"filename": shard_file_name(r, world_size)} for r in range(world_size)],
             "_fingerprint": hashlib.sha256(description.encode()).hexdigest()[:16], "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    with atomic_write(folder / "state.json", "w") as f:
        json.dump(state, f, indent=2)


def cache_latents(
    vae: SphereVAE,
    data_args: DataArguments,
    output_dir: str | os.PathLike,
    batch_size: int = 64,
    accelerator: Any | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    disable_tqdm: bool = False,
) -> Path:
    """Encode the center crops of the dataset of ``data_args`` (and their flips) into a latent cache.

    With an ``accelerate.Accelerator`` each process encodes a contiguous shard into its own Arrow file of the
    cache (``data-<rank>-of-<world>.arrow``); the main process then only writes the metadata that makes the folder
    a ``save_to_disk`` folder (:func:`write_shard_index`), which ``datasets.load_from_disk`` opens memory-mapped: no
    process reads, concatenates or copies another's shard. The temporary folder is renamed to ``output_dir`` when
    complete; it lies next to ``output_dir`` and must be on a filesystem all processes share. ``overwrite``
    replaces only a latent cache that holds neither the data nor the VAE (``utils.check_output_folder``).
    The class count and names are the dataset's (a ``num_classes`` that differs from its ClassLabel is refused).
    The main process prints a summary and shows a progress bar (with ETA) over its shard (``disable_tqdm``).
    Returns ``output_dir`` (on every process, after the cache is complete).
    """
    _check_cache_arguments(vae, data_args)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = rank == 0
    device = accelerator.device if accelerator is not None else next(vae.parameters()).device
    output_dir = Path(output_dir)

    def barrier() -> None:
        if accelerator is not None:
            accelerator.wait_for_everyone()

    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    vae_path = getattr(vae.config, "_name_or_path", None)
    check_output_folder(output_dir, overwrite, kind="latent_cache", inputs=[*data_inputs(data_args), vae_path],
                        option="--output_dir")
    # validates columns and labels on every process, before any work; the class count is the dataset's
    raw = load_image_dataset(data_args, strict_num_classes=True)
    id2label = class_names(raw, data_args.label_column)
    num_classes = resolve_num_classes(data_args, raw)
    # the shards of every process, then the finished cache, go to one staging folder beside output_dir
    partial = stage_folder(output_dir, shared=True) if is_main else shared_staging_path(output_dir)
    staged = partial / "dataset"
    try:
        if is_main:
            staged.mkdir()
        barrier()
        vae = vae.to(device).eval().requires_grad_(False)
        features = _cache_features(vae.num_tokens, vae.config.latent_dim, id2label, vae.config.posterior)
        start, end = _shard_bounds(len(raw), world, rank)
        shard = _CenterCropDataset(raw.select(range(start, end)), data_args, offset=start)
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        if is_main:
            print(_startup_summary(vae, len(raw), num_classes, batch_size, world, output_dir), file=sys.stderr,
                  flush=True)
        autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
        # the main process's progress bar stands for all
        written, skipped = _encode_shard(vae, loader, features, staged / shard_file_name(rank, world), device,
                                         autocast, disable_tqdm or not is_main)
        (partial / f"shard-{rank:05d}.json").write_text(json.dumps({"written": written, "skipped": skipped}))
        logger.info("process %d encoded %d images (%d undecodable skipped)", rank, written, skipped)
        barrier()
        if is_main:
            _finish_cache(partial, output_dir, world, features, vae, data_args, num_classes, id2label)
    finally:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return output_dir


def _check_cache_arguments(vae: SphereVAE, data_args: DataArguments) -> None:
    """Refuse data arguments that the latent cache of ``vae`` cannot use."""
    check_arguments(data_args)
    if data_args.streaming:
        raise ValueError("the latent cache needs a map-style dataset; set streaming=False")
    if data_args.resolution != vae.config.image_size:
        raise ValueError(f"resolution {data_args.resolution} differs from the VAE's image_size "
                         f"{vae.config.image_size}; set --resolution {vae.config.image_size}")


def _encode_shard(vae: SphereVAE, loader: torch.utils.data.DataLoader, features: datasets.Features, path: Path,
                  device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                  disable_tqdm: bool) -> tuple[int, int]:
    """Encode the batches of ``loader`` into the Arrow file ``path``; returns the images written and skipped."""
    skipped, written = 0, 0
    progress = tqdm(loader, desc="latent cache", unit="batch", dynamic_ncols=True, disable=disable_tqdm)
    with ArrowWriter(features=features, path=str(path)) as writer:
        for batch in progress:
            skipped += batch["num_skipped"]
            if "pixel_values" not in batch:
                continue
            with autocast():
                post = encode_posteriors(vae, batch["pixel_values"].to(device))
            writer.write_batch({**{k: v.numpy() for k, v in post.items()},
                                "class_labels": batch["class_labels"], "index": batch["index"]})
            written += len(batch["index"])
        writer.finalize()
    return written, skipped


def _finish_cache(partial: Path, output_dir: Path, world: int, features: datasets.Features, vae: SphereVAE,
                  data_args: DataArguments, num_classes: int | None, id2label: dict[int, str] | None) -> None:
    """Make the staged shards of ``world`` processes a ``save_to_disk`` folder with its ``latent_cache.json``, and
    swap it into place as ``output_dir`` (an old cache there is deleted only after the swap). Main process."""
    staged = partial / "dataset"
    stats = [json.loads((partial / f"shard-{r:05d}.json").read_text()) for r in range(world)]
    info = _cache_info(vae, data_args, num_classes, id2label, stats)
    write_shard_index(staged, world, features, json.dumps(info))
    (staged / CACHE_INFO_FILE).write_text(json.dumps(info, indent=2))
    swap_folder_into_place(staged, output_dir)
    logger.info("wrote a latent cache of %d images to %s (%d undecodable skipped)", info["num_examples"],
                output_dir, info["num_skipped"])


def _startup_summary(vae: SphereVAE, num_images: int, num_classes: int | None, batch_size: int, world: int,
                     output_dir: Path) -> str:
    """A few lines on what ``cache_latents`` encodes."""
    per_process = math.ceil(num_images / world)
    return "\n".join([
        "Latent cache",
        f"  encoder:    SphereVAE {sum(p.numel() for p in vae.parameters()):,} parameters, {vae.config.image_size}px "
        f"-> {vae.num_tokens} tokens x {vae.config.latent_dim}",
        f"  data:       {num_images:,} images (center crops and their flips), {num_classes} classes",
        f"  batches:    {batch_size} per process x {world} process{'es' if world != 1 else ''}, "
        f"{math.ceil(per_process / batch_size):,} batches per process",
        f"  output:     {output_dir}",
    ])


def load_latent_cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a latent cache (``latent_cache.json``); ``id2label`` keys are ints, and ``posterior`` is
    ``"power_spherical"`` for a cache written before Gaussian posteriors existed."""
    file = Path(path) / CACHE_INFO_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not a latent cache (no {CACHE_INFO_FILE}); write one with cache_latents")
    info = json.loads(file.read_text())
    info.setdefault("posterior", "power_spherical")
    if info["posterior"] not in POSTERIOR_CLASSES:
        raise ValueError(f"latent cache {path} has an unknown posterior {info['posterior']!r}")
    if info.get("id2label"):
        info["id2label"] = {int(k): v for k, v in info["id2label"].items()}
    return info


def check_latent_cache(path: str, vae: SphereVAE) -> dict[str, Any]:
    """The info of the latent cache at ``path`` (``load_latent_cache_info``), refused with a ``ValueError`` when its
    tokens or posterior are not those ``vae`` makes."""
    info = load_latent_cache_info(path)
    shape = (int(info["num_tokens"]), int(info["latent_dim"]))
    if shape != (vae.num_tokens, vae.config.latent_dim):
        raise ValueError(f"latent cache {path} holds {shape} tokens, the VAE makes ({vae.num_tokens}, "
                         f"{vae.config.latent_dim})")
    if info["posterior"] != vae.config.posterior:
        raise ValueError(f"latent cache {path} holds {info['posterior']} posteriors, the VAE has a "
                         f"{vae.config.posterior} posterior")
    return info


def _torch_seed(seed: int, epoch: int, index: int) -> int:
    a, b = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


class LatentCacheDataset(torch.utils.data.Dataset):
    """AR training items from a latent cache: ``{"latents": (L, d) AR tokens, "class_labels": ()}``.

    Each item draws, from a ``torch.Generator`` seeded per ``(seed, epoch, index)``, the flip (probability 0.5
    when ``hflip``) and then a fresh sample of the cached posterior, made into AR tokens as ``SphereVAE.tokens``
    does: on the radius-sqrt(d) sphere for the Power Spherical posterior, and for a Gaussian one when
    ``normalize`` (the AR model's ``normalize_tokens``), else the Gaussian draw itself. ``sample_posterior=False``
    takes the posterior mode instead.
    """

    def __init__(self, path: str | os.PathLike, seed: int = 0, hflip: bool = True, sample_posterior: bool = True,
                 normalize: bool = True):
        self.path, self.seed, self.hflip, self.sample_posterior = str(path), int(seed), hflip, sample_posterior
        self.normalize = bool(normalize)
        self.info = load_latent_cache_info(path)
        self.posterior = self.info["posterior"]
        self._distribution = POSTERIOR_CLASSES[self.posterior]
        names = self._distribution.parameter_names
        self.latent_dim, self.num_tokens = int(self.info["latent_dim"]), int(self.info["num_tokens"])
        self.num_classes = int(self.info["num_classes"])
        self.id2label: dict[int, str] | None = self.info.get("id2label")
        self.latent_radius = math.sqrt(self.latent_dim)
        data = datasets.load_from_disk(self.path)
        self._plain = data.select_columns([*names, "class_labels"]).with_format("numpy")
        self._flipped = data.select_columns([n + "_flip" for n in names] + ["class_labels"]).with_format("numpy")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: changes every flip and posterior draw."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._plain)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(_torch_seed(self.seed, self.epoch, index))
        flip = bool(torch.rand((), generator=g) < 0.5) if self.hflip else False
        row = (self._flipped if flip else self._plain)[int(index)]
        suffix = "_flip" if flip else ""
        dist = self._distribution.from_parameters(
            {name: torch.from_numpy(row[name + suffix]) for name in self._distribution.parameter_names})
        z = dist.sample(g) if self.sample_posterior else dist.mode()
        return {"latents": posterior_tokens(z.float(), self.posterior, self.latent_radius, self.normalize),
                "class_labels": torch.tensor(int(row["class_labels"]), dtype=torch.long)}


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python examples/cache_latents.py --pretrained_vae ... --output_dir ... <data arguments>``."""
    from accelerate import Accelerator, DistributedType
    from transformers import HfArgumentParser

    parser = HfArgumentParser((DataArguments, CacheArguments))
    data_args, cache_args = parser.parse_args_into_dataclasses(args=argv)
    accelerator = Accelerator(mixed_precision=cache_args.mixed_precision, cpu=cache_args.cpu,
                              kwargs_handlers=process_group_kwargs(cache_args.ddp_timeout))
    check_one_job(accelerator.distributed_type != DistributedType.NO, "--cpu")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    vae = load_vae(cache_args.pretrained_vae)
    return cache_latents(vae, data_args, cache_args.output_dir, batch_size=cache_args.batch_size,
                         accelerator=accelerator, num_workers=cache_args.num_workers, overwrite=cache_args.overwrite,
                         disable_tqdm=cache_args.disable_tqdm)
