"""The setup every training run of a SphereAR transformer shares (:func:`~.trainer.train_sphere_ar`,
:func:`~.lora.train_lora`): the checks made before any work (:func:`prepare_run`), the training data
(:func:`load_training_data`), training with resume and the final save and push (:func:`train_and_save`), and the
record of what the run trained on (:func:`training_data_record`)."""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, set_seed
from transformers.training_args import ParallelMode

from ..hub.cards import public_model_name
from ..utils import check_output_folder
from ..vae import SphereVAE
from .argument_checks import check_arguments, check_input_path
from .data import build_image_dataset, class_names, resolve_num_classes
from .device_setup import check_one_job
from .latent_cache import LatentCacheDataset, check_latent_cache

__all__ = ["TrainingData", "load_training_data", "prepare_run", "train_and_save", "training_data_record"]

logger = logging.getLogger(__name__)


def prepare_run(args: Any, training_args: TrainingArguments, data_args: Any, output_dir: str | os.PathLike, *,
                kind: str, inputs: Sequence[str | os.PathLike | None], parameter: str,
                input_paths: Sequence[str] = ()) -> Path:
    """Check a run's arguments before any work and seed it; returns ``output_dir`` as a ``Path``.

    ``args`` is the run's own dataclass (the model's, the adapter's); ``input_paths`` name its fields that are
    local paths it reads (checked to exist). ``output_dir`` (the folder the run ends by writing, of ``kind``, set by
    the argument ``parameter``) must be writable without replacing any of ``inputs`` (``utils.check_output_folder``).
    """
    check_arguments(args, training_args, data_args)
    check_one_job(training_args.parallel_mode != ParallelMode.NOT_PARALLEL, "--use_cpu")
    for name in input_paths:
        check_input_path(f"--{name}", getattr(args, name))
    check_output_folder(output_dir, True, kind=kind, inputs=inputs, option=parameter)
    set_seed(training_args.seed)
    return Path(output_dir)


@dataclass
class TrainingData:
    """The training dataset of a run, the class count the model is built for and the class names (if known)."""

    dataset: Any
    num_classes: int
    id2label: dict[int, str] | None = None


def load_training_data(data_args: Any, vae: SphereVAE, seed: int, num_classes: int | None = None,
                       normalize: bool = True) -> TrainingData:
    """The dataset of ``data_args`` (a :class:`~.data.DataArguments`): a latent cache made with ``vae`` (its tokens
    projected onto the sphere when ``normalize``: the model's ``normalize_tokens``) or images, at ``vae``'s image
    size, that the trainer encodes with it.

    ``num_classes`` None: the classes come from the data (a ``data_args.num_classes`` that differs is refused);
    else the number of class ids the data's labels stand for (the data may hold fewer classes).
    """
    if data_args.latent_cache:
        check_latent_cache(data_args.latent_cache, vae)
        dataset = LatentCacheDataset(data_args.latent_cache, seed=seed, hflip=data_args.hflip, normalize=normalize)
        if num_classes is None and data_args.num_classes and data_args.num_classes != dataset.num_classes:
            raise ValueError(f"--num_classes {data_args.num_classes} does not match the latent cache "
                             f"{data_args.latent_cache}, which holds {dataset.num_classes} classes; drop --num_classes")
        if num_classes is not None and dataset.num_classes > num_classes:
            raise ValueError(f"latent cache {data_args.latent_cache} has {dataset.num_classes} classes, but "
                             f"{num_classes} are mapped to the base model's classes")
        return TrainingData(dataset, num_classes or dataset.num_classes, dataset.id2label)
    if data_args.resolution != vae.config.image_size:
        logger.info("resolution set to the VAE's image_size %d", vae.config.image_size)
        data_args.resolution = vae.config.image_size
    if num_classes is None:  # the class count and names come from the dataset; a --num_classes that differs is refused
        dataset = build_image_dataset(data_args, seed=seed, strict_num_classes=True)
        return TrainingData(dataset, resolve_num_classes(data_args, dataset),
                            class_names(dataset.dataset, data_args.label_column))
    if data_args.num_classes != num_classes:
        logger.info("num_classes set to %d (the class ids the labels stand for)", num_classes)
        data_args.num_classes = num_classes
    return TrainingData(build_image_dataset(data_args, seed=seed), num_classes)


def train_and_save(trainer: Trainer, output_dir: str | os.PathLike, *, data_args: Any, init: str | None,
                   inputs: Sequence[str | os.PathLike | None] = (), id2label: dict[int, str] | None = None) -> Path:
    """Train (resuming as ``args.resume_from_checkpoint`` says), then write what the run makes to ``output_dir``
    (the trainer's ``save_final``: a pipeline, an adapter) with the record of the run (``init``: the weights it
    started from, None for a random init) and, with ``push_to_hub``, upload it (``push_final``)."""
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    init = public_model_name(init or None) or "random"
    record = {**training_data_record(data_args, trainer.train_dataset), "init": init}
    out = trainer.save_final(output_dir, inputs=inputs, training_data=record, id2label=id2label)
    if trainer.args.push_to_hub:
        trainer.push_final(out)
    return out


def training_data_record(data_args: Any, dataset: Any = None) -> dict[str, Any]:
    """What a run trained on, for ``SphereARTrainer.training_record``: the dataset (a Hub id, or a local folder by
    its name; through a latent cache, the cache's source), split, number of examples and classes."""
    source = data_args
    if getattr(data_args, "latent_cache", None):
        info = getattr(dataset, "info", None) or getattr(getattr(dataset, "dataset", None), "info", None)
        source = types.SimpleNamespace(**(info.get("source") or {})) if isinstance(info, dict) else None
    record: dict[str, Any] = {}
    hub_id = getattr(source, "dataset_name", None)
    if hub_id:
        record["dataset"] = public_model_name(hub_id)
        if record["dataset"] == hub_id:
            record["hub_dataset"] = hub_id
    elif getattr(source, "train_data_dir", None):
        record["dataset"] = f"{public_model_name(source.train_data_dir)} (a local image folder)"
    elif getattr(source, "dataset_path", None):
        record["dataset"] = f"{public_model_name(source.dataset_path)} (a local dataset folder)"
    if getattr(data_args, "latent_cache", None):
        cache = f"latent cache {public_model_name(data_args.latent_cache)}"
        record["dataset"] = f"{record['dataset']}, through the {cache}" if record.get("dataset") else cache
    if getattr(source, "split", None):
        record["split"] = source.split
    try:
        record["num_examples"] = len(dataset) if dataset is not None else None
    except TypeError:  # a streamed dataset
        pass
    if getattr(dataset, "num_classes", None):
        record["num_classes"] = int(dataset.num_classes)
    return {k: v for k, v in record.items() if v is not None}
