"""Image-classification data for SphereAR training: the data arguments, loading and validation, the datasets.

Any ``datasets`` dataset with an image column and an integer label column works: a Hub dataset
(``dataset_name``, optionally streamed), a local imagefolder (``train_data_dir``) or a ``save_to_disk``
folder (``dataset_path``). Images are decoded here with PIL (the ``Image`` feature is cast to
``decode=False``) so that an undecodable file is skipped and counted instead of crashing a run.

Each item is augmented as the official recipe does (:mod:`.image_transforms`: a random crop with probability
``aug_ratio``, otherwise the ADM center crop; a random flip; pixels in [-1, 1]). ``aug_ratio`` decays linearly to 0
between two epochs. Every draw comes from a numpy ``Generator`` seeded from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import datasets.distributed
import numpy as np
import torch

from .image_transforms import (
    center_crop,
    decode_image,
    describe_image_value,
    example_rng,
    pixels_to_tensor,
    transform_image,
)

__all__ = [
    "DataArguments",
    "ImageDataset",
    "IterableImageDataset",
    "aug_ratio_at",
    "build_image_dataset",
    "class_names",
    "collate_images",
    "load_image_dataset",
    "probe_images",
    "resolve_num_classes",
    "skipped_image_count",
    "undecoded_images",
    # defined in .image_transforms; importable from here too (tests/test_ablation.py)
    "center_crop",
    "decode_image",
    "pixels_to_tensor",
]

logger = logging.getLogger(__name__)

# The official recipe: random crops with probability 1.0 until ``aug_decay_start_epoch``, decaying linearly to 0
# at ``aug_decay_end_epoch``.
DEFAULT_AUG_RATIO = 1.0

_skipped = 0


@dataclass
class DataArguments:
    """Where the training images come from and how they are augmented (``HfArgumentParser``-ready)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id (e.g. ILSVRC/imagenet-1k; gated: run `hf auth login` first) or a local "
                          "folder that `datasets.load_dataset` understands (parquet/arrow/... files)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's config name, if any."})
    train_data_dir: str | None = field(
        default=None,
        metadata={"help": "A local imagefolder (one subfolder per class), loaded with load_dataset('imagefolder')."},
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "A folder written by `Dataset.save_to_disk` (loaded with load_from_disk)."}
    )
    split: str = field(default="train", metadata={"help": "The split to train on."})
    image_column: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column: str = field(default="label", metadata={"help": "The column holding the integer class ids."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading/preparing it first (training only; the latent "
                          "cache needs a map-style dataset)."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "Streaming only: size of the shuffle buffer (0 disables shuffling; map-style datasets are "
                          "shuffled by the sampler)."},
    )
    resolution: int = field(default=256, metadata={"help": "Training resolution (square crops)."})
    num_classes: int | None = field(
        default=None,
        metadata={"help": "Number of classes; labels must lie in [0, num_classes). Default (or 0): the dataset's, "
                          "from the label column's ClassLabel feature (an imagefolder's folder names); the class "
                          "names go into the pipeline. The AR trainer and the latent cache refuse a value that "
                          "differs from the dataset's ClassLabel."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N examples (debugging, quick runs)."}
    )
    aug_ratio: float = field(
        default=DEFAULT_AUG_RATIO,
        metadata={"help": "Probability of a random crop (instead of the center crop) before the decay starts "
                          "(official: 1.0)."},
    )
    aug_decay_start_epoch: int = field(
        default=350, metadata={"help": "Epoch at which aug_ratio starts decaying linearly to 0 (official: 350)."}
    )
    aug_decay_end_epoch: int = field(
        default=375, metadata={"help": "Epoch from which aug_ratio is 0, i.e. only center crops (official: 375)."}
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips (probability 0.5)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    latent_cache: str | None = field(
        default=None,
        metadata={"help": "Path of a latent cache written by examples/cache_latents.py; the AR trainer then reads "
                          "posterior parameters instead of images."},
    )


def aug_ratio_at(epoch: int, args: DataArguments) -> float:
    """Random-crop probability at ``epoch``: ``args.aug_ratio`` before the decay, linear to 0 across it, then 0.

    As in the official code, an invalid window (start < 0 or end <= start) disables the decay.
    """
    start, end = args.aug_decay_start_epoch, args.aug_decay_end_epoch
    if start < 0 or end <= start or epoch < start:
        factor = 1.0
    elif epoch >= end:
        factor = 0.0
    else:
        factor = 1.0 - (epoch - start) / float(end - start)
    return float(min(1.0, max(0.0, args.aug_ratio * factor)))


# ---------------------------------------------------------------------------------------------------------------
# loading and validation


def _select_split(ds: Any, split: str, where: str) -> Any:
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"{where} has no split {split!r}; available splits: {sorted(ds)}")
        return ds[split]
    return ds


def _label_range_error(args: DataArguments, num_classes: int | None, lo: Any, hi: Any, where: str) -> ValueError:
    bound = f"[0, num_classes) = [0, {num_classes})" if num_classes is not None else "[0, num_classes)"
    return ValueError(
        f"label column {args.label_column!r}: {where} has labels in [{lo}, {hi}], but class ids must lie in "
        f"{bound}; set --num_classes or fix the labels"
    )


def _resolve_num_classes(args: DataArguments, features: datasets.Features | None, strict: bool = False
                         ) -> int | None:
    """The class count: ``args.num_classes`` if given, else the label column's ClassLabel count, else None
    (unknown: labels are then only checked to be >= 0).

    ``strict`` (a model is trained on the labels: the AR trainer, the latent cache): a given count must equal
    the ClassLabel's, and a dataset without one needs an explicit count. Otherwise (the S-VAE, which ignores the
    labels; LoRA, whose class ids are the base model's) a given count is only an upper bound of the labels.
    """
    feature = features.get(args.label_column) if features is not None else None
    names = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    if args.num_classes:  # None or 0: from the dataset
        if args.num_classes < 0:
            raise ValueError(f"num_classes must be a positive int, got {args.num_classes}")
        if strict and names is not None and names != args.num_classes:
            shown = ", ".join(feature.names[:5]) + (", ..." if names > 5 else "")
            raise ValueError(f"--num_classes {args.num_classes} does not match the dataset: label column "
                             f"{args.label_column!r} names {names} classes ({shown}); drop --num_classes to use "
                             "the dataset's")
        return args.num_classes
    if names is not None:
        return names
    if strict:
        raise ValueError(f"cannot tell the number of classes: label column {args.label_column!r} has no ClassLabel "
                         f"feature (got {feature!r}); pass --num_classes")
    return None


def resolve_num_classes(args: DataArguments, dataset: Any, strict: bool = True) -> int | None:
    """The class count a run trains with (see ``_resolve_num_classes``) for a loaded dataset (``datasets`` or
    :class:`ImageDataset` / :class:`IterableImageDataset`)."""
    dataset = getattr(dataset, "dataset", dataset)
    return _resolve_num_classes(args, getattr(dataset, "features", None), strict)


def _check_columns(args: DataArguments, columns: Sequence[str] | None) -> None:
    if columns is None:
        return
    for kind, name in (("image", args.image_column), ("label", args.label_column)):
        if name not in columns:
            raise ValueError(f"{kind} column {name!r} not found in the dataset; its columns are {list(columns)} "
                             f"(set --{kind}_column)")


def _check_labels_map_style(ds: datasets.Dataset, args: DataArguments, num_classes: int | None) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[args.label_column] if len(ds) else pa.chunked_array([], pa.int64())
    if not (pa.types.is_integer(col.type) or pa.types.is_null(col.type)) and len(ds):
        raise ValueError(f"label column {args.label_column!r} must hold integer class ids, got {col.type}; "
                         "convert it first (e.g. Dataset.class_encode_column)")
    if col.null_count:
        raise ValueError(f"label column {args.label_column!r} has {col.null_count} missing labels")
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise _label_range_error(args, num_classes, lo, hi, "the dataset")


class _StreamLabelCheck:
    """Lazily validates each streamed example's label (a picklable callable for ``IterableDataset.map``)."""

    def __init__(self, label_column: str, image_column: str, num_classes: int | None):
        self.label_column, self.image_column, self.num_classes = label_column, image_column, num_classes

    def __call__(self, example: dict[str, Any], idx: int) -> dict[str, Any]:
        for kind, name in (("image", self.image_column), ("label", self.label_column)):
            if name not in example:
                raise ValueError(f"{kind} column {name!r} not found in streamed example {idx}; its columns are "
                                 f"{list(example)} (set --{kind}_column)")
        label = example[self.label_column]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"label column {self.label_column!r}: streamed example {idx} has label {label!r}; "
                             "class ids must be integers")
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            bound = f" = [0, {self.num_classes})" if self.num_classes is not None else ""
            raise ValueError(f"label column {self.label_column!r}: streamed example {idx} has label {label}, but "
                             f"class ids must lie in [0, num_classes){bound}")
        return example


def load_image_dataset(args: DataArguments, strict_num_classes: bool = False
                       ) -> datasets.Dataset | datasets.IterableDataset:
    """Load the raw dataset described by ``args`` and validate its columns and labels.

    ``strict_num_classes``: a given ``args.num_classes`` must equal the dataset's ClassLabel count, and a dataset
    without one needs it (``_resolve_num_classes``); used where a model is trained on the labels.

    Map-style datasets are checked in full here (column presence, integer labels in ``[0, num_classes)``);
    streamed ones have their columns checked when the features are known and each label checked lazily (their
    image column is returned as ``Image(decode=False)``: a streamed map would otherwise decode every image first).
    Raises ValueError with the column name / the valid range on bad data.
    """
    sources = [n for n in ("dataset_name", "train_data_dir", "dataset_path") if getattr(args, n)]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of dataset_name, train_data_dir, dataset_path (got {sources or 'none'})")
    if args.resolution <= 0:
        raise ValueError(f"resolution must be positive, got {args.resolution}")
    if args.dataset_name:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split,
                                   streaming=args.streaming, cache_dir=args.cache_dir)
    elif args.train_data_dir:
        ds = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split=args.split,
                                   streaming=args.streaming, cache_dir=args.cache_dir)
    else:
        ds = _select_split(datasets.load_from_disk(args.dataset_path), args.split, args.dataset_path)
        if args.streaming:  # several shards, so that DataLoader workers and processes can split the stream
            ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    ds = _select_split(ds, args.split, "the dataset")

    if isinstance(ds, datasets.IterableDataset):
        _check_columns(args, ds.column_names)
        num_classes = _resolve_num_classes(args, ds.features, strict_num_classes)
        if args.max_train_samples is not None:
            ds = ds.take(args.max_train_samples)
        # decode=False before the lazy check: a mapped stream decodes its input with the features of that point
        ds = undecoded_images(ds, args.image_column)
        check = _StreamLabelCheck(args.label_column, args.image_column, num_classes)
        return ds.map(check, with_indices=True, features=ds.features)

    _check_columns(args, ds.column_names)
    num_classes = _resolve_num_classes(args, ds.features, strict_num_classes)
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    _check_labels_map_style(ds, args, num_classes)
    return ds


def class_names(dataset: datasets.Dataset | datasets.IterableDataset, label_column: str = "label"
                ) -> dict[int, str] | None:
    """``{class_id: name}`` from the label column's ClassLabel feature, or None when it has none."""
    features = dataset.features
    feature = features.get(label_column) if features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names))
    return None


def undecoded_images(ds: Any, image_column: str) -> Any:
    """``ds`` with its image column cast to ``Image(decode=False)``, so that the datasets of this package decode the
    images themselves (and skip an undecodable one instead of failing)."""
    features = ds.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


# ---------------------------------------------------------------------------------------------------------------
# torch datasets


class _Augmenter:
    """The per-epoch state shared by the map-style and iterable datasets."""

    def __init__(self, args: DataArguments, seed: int):
        self.args, self.seed = args, int(seed)
        self.image_column, self.label_column = args.image_column, args.label_column
        self.resolution = args.resolution
        self.epoch = 0
        self.aug_ratio = aug_ratio_at(0, args)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: changes every random draw and the random-crop probability."""
        self.epoch = int(epoch)
        self.aug_ratio = aug_ratio_at(self.epoch, self.args)

    def set_aug_ratio(self, aug_ratio: float) -> None:
        """Override the random-crop probability (until the next ``set_epoch``)."""
        self.aug_ratio = float(aug_ratio)

    def make_item(self, example: dict[str, Any], index: int) -> dict[str, torch.Tensor] | None:
        value = example[self.image_column]
        try:
            image = decode_image(value)
        except Exception as err:  # any undecodable file: skip it, never crash the run
            logger.warning("skipping undecodable image (example %d, %s): %s: %s", index, describe_image_value(value),
                           type(err).__name__, err)
            return None
        rng = example_rng(self.seed, self.epoch, index)
        pixels = transform_image(image, self.resolution, rng, self.aug_ratio, self.args.hflip)
        return {"pixel_values": pixels, "class_labels": torch.tensor(int(example[self.label_column]),
                                                                     dtype=torch.long)}


class ImageDataset(_Augmenter, torch.utils.data.Dataset):
    """Map-style training dataset: ``{"pixel_values": (3, res, res) in [-1, 1], "class_labels": ()}`` or None
    for an undecodable image (dropped by :func:`collate_images`).

    Call ``set_epoch`` before each epoch (and recreate the DataLoader, or avoid ``persistent_workers``, so that
    workers see it).
    """

    def __init__(self, dataset: datasets.Dataset, args: DataArguments, seed: int = 0):
        super().__init__(args, seed)
        dataset = dataset.select_columns([args.image_column, args.label_column])
        self.dataset = undecoded_images(dataset, args.image_column)
        probe_images(self.dataset, args.image_column)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        return self.make_item(self.dataset[int(index)], int(index))


class IterableImageDataset(_Augmenter, torch.utils.data.IterableDataset):
    """Streaming training dataset with the same items as :class:`ImageDataset`.

    The random draws of an example are seeded from ``(seed, epoch, index)`` with ``index`` the example's position
    in this process's stream, interleaved over DataLoader workers and processes so that it is unique.
    """

    def __init__(self, dataset: datasets.IterableDataset, args: DataArguments, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(args, seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.dataset = undecoded_images(dataset, args.image_column)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(self.epoch)  # reshuffles a shuffled stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, example in enumerate(self.dataset):
            index = (position * workers + worker) * self.world_size + self.rank
            yield self.make_item(example, index)


def build_image_dataset(args: DataArguments, seed: int = 0, rank: int = 0, world_size: int = 1,
                        strict_num_classes: bool = False) -> ImageDataset | IterableImageDataset:
    """Load, validate and wrap the dataset for training (``strict_num_classes``: see :func:`load_image_dataset`).

    For a streamed dataset, ``rank``/``world_size`` shard it with ``split_dataset_by_node`` (leave the defaults
    when accelerate dispatches batches from the main process) and ``shuffle_buffer_size`` shuffles it.
    Map-style datasets are sharded and shuffled by the trainer's sampler.
    """
    raw = load_image_dataset(args, strict_num_classes)
    if isinstance(raw, datasets.IterableDataset):
        if args.shuffle_buffer_size > 0:
            raw = raw.shuffle(seed=int(seed), buffer_size=args.shuffle_buffer_size)
        if world_size > 1:
            raw = datasets.distributed.split_dataset_by_node(raw, rank=rank, world_size=world_size)
        return IterableImageDataset(raw, args, seed, rank=rank, world_size=world_size)
    return ImageDataset(raw, args, seed)


PROBED_EXAMPLES = 16


def probe_images(dataset: Any, column: str, count: int = PROBED_EXAMPLES) -> None:
    """Refuse a ``column`` in which none of the first ``count`` examples decodes as an image (e.g. the label column
    named as the image column): a run that would skip every example and exit 0. A few bad files are skipped as
    ever."""
    n = min(count, len(dataset))
    failures = []
    for i in range(n):
        value = dataset[i][column]
        try:
            decode_image(value)
            return
        except Exception as err:  # noqa: BLE001  (whatever the decoder raises: the same test as make_item)
            failures.append(f"{describe_image_value(value)}: {type(err).__name__}")
    if failures:
        raise ValueError(f"--image_column {column!r}: none of the first {n} examples holds a decodable image "
                         f"(example 0: {failures[0]})")


def skipped_image_count() -> int:
    """How many undecodable images :func:`collate_images` has dropped in this process."""
    return _skipped


def collate_images(batch: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Stack items into ``{"pixel_values": (B, 3, res, res), "class_labels": (B,)}``, dropping (and counting) the
    None items of undecodable images. Returns None when every item of the batch was undecodable."""
    global _skipped
    items = [item for item in batch if item is not None]
    dropped = len(batch) - len(items)
    if dropped:
        _skipped += dropped
        logger.warning("dropped %d undecodable image(s) from a batch (%d so far in this process)", dropped, _skipped)
    if not items:
        return None
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "class_labels": torch.stack([item["class_labels"] for item in items]),
    }
