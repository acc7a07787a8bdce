"""Training a LoRA adapter of a SphereAR pipeline's transformer (:func:`train_lora`, behind
``examples/train_lora.py``).

It is :func:`~.trainer.train_sphere_ar`'s run (:mod:`.run`: the checks, the data, training with resume, the final
save and push) on the adapters :func:`sphere_ar_hf.lora.add_lora` injects: images are encoded on the fly by the
pipeline's frozen VAE (or read from a latent cache made with it), and the run ends by writing the adapter
(``adapter_model.safetensors`` + ``adapter_config.json``, :func:`sphere_ar_hf.lora.save_lora`) to a folder that
appears only once complete. The adapter API itself (:mod:`sphere_ar_hf.lora`) imports none of this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from ..lora import adapter_parameter_count, add_lora, build_lora_config, save_lora
from .arguments import SphereARTrainingArguments
from .latent_cache import data_inputs
from .run import load_training_data, prepare_run, train_and_save
from .trainer import SphereARTrainer, collate_training_batch

__all__ = ["LoraArguments", "LoraTrainer", "LoraTrainingArguments", "RelabelingCollator", "train_lora"]

logger = logging.getLogger(__name__)


@dataclass
class LoraArguments:
    """The base pipeline and the adapter's shape (``HfArgumentParser``-ready)."""

    pretrained_model: str = field(
        metadata={"help": "The base pipeline (a folder or Hub repo id with transformer/ and vae/); its frozen VAE "
                          "encodes the training images."})
    adapter_output_dir: str | None = field(
        default=None, metadata={"help": "Where the adapter is written (default: <output_dir>/adapter)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank; scale 1)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_head: bool = field(default=False, metadata={"help": "Also adapt the diffusion head's linears."})
    train_class_embeddings: list[int] | None = field(
        default=None,
        metadata={"help": "Class ids whose class-embedding rows are trained too (re-purposed classes; "
                          "num_classes is the null class). Only these rows are stored in the adapter."})
    class_ids: list[int] | None = field(
        default=None,
        metadata={"help": "The base model's class id for each dataset label (dataset label i trains class "
                          "class_ids[i], e.g. one imagefolder class re-purposing class 7). Default: the dataset's "
                          "labels are the model's class ids."})
    target_modules: str | None = field(
        default=None, metadata={"help": "A full-module-name regex that replaces the default LoRA targets."})


@dataclass
class LoraTrainingArguments(SphereARTrainingArguments):
    """:class:`~.arguments.SphereARTrainingArguments` with defaults for a short adapter run."""

    output_dir: str | None = field(default="lora-results", metadata={"help": "Checkpoints, logs and the adapter."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr: float = field(default=1e-4, metadata={"help": "Learning rate at the end of the cosine decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float in (0, 1): a ratio)."})
    decay_start: int = field(default=1, metadata={"help": "Step where the cosine decay starts (<= 0: none)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA matrices."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the adapter weights (<= 0: none)."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints: 'no', 'epoch' or 'steps'."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers ('none' for none)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N optimizer steps."})


class RelabelingCollator:
    """:func:`~.trainer.collate_training_batch`, then dataset label ``i`` -> class id ``class_ids[i]``."""

    def __init__(self, class_ids: Sequence[int]):
        self.table = torch.tensor([int(c) for c in class_ids], dtype=torch.long)

    def __call__(self, items: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        batch = collate_training_batch(items)
        if "class_labels" in batch:
            batch["class_labels"] = self.table[batch["class_labels"].long()]
        return batch


class LoraTrainer(SphereARTrainer):
    """:class:`~.trainer.SphereARTrainer` for a PEFT-wrapped transformer, whose run ends by writing the adapter.

    Its weight-decay rule (``training.optimization``) leaves, of the trainable adapter, exactly the LoRA matrices
    decayed: the class rows live in ``class_embedding``, which is never decayed. ``base_model``: the base
    pipeline, as the adapter records it (``adapter_config.json``'s ``base_model_name_or_path``).
    """

    def __init__(self, *args: Any, base_model: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base_model = base_model

    def save_final(self, output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (),
                   training_data: dict[str, Any] | None = None, id2label: dict[int, str] | None = None) -> Path:
        """Write the adapter to ``output_dir`` (:func:`~sphere_ar_hf.lora.save_lora`, on the main process) with the
        record of the run (:meth:`training_record` of ``training_data``); ``id2label`` is not used."""
        if self.args.should_save:
            save_lora(self.accelerator.unwrap_model(self.model), output_dir, base_model_name_or_path=self.base_model,
                      inputs=inputs, training_info=self.training_record(training_data))
            logger.info("wrote the adapter to %s", output_dir)
        self.accelerator.wait_for_everyone()
        return Path(output_dir)

    def push_final(self, folder: str | os.PathLike) -> str | None:
        """Upload the adapter folder to :meth:`hub_repo_id` with its card (``push_lora``); returns its URL on the
        main process."""
        if not self.args.should_save:
            return None
        from ..hub.push import push_lora

        url = push_lora(folder, self.hub_repo_id(), license=getattr(self.args, "hub_license", None),
                        private=bool(self.args.hub_private_repo), commit_message="End of training",
                        token=self.args.hub_token, revision=self.args.hub_revision)
        logger.info("pushed the adapter to %s", url)
        return url


def relabeling_collator(class_ids: Sequence[int] | None, num_classes: int) -> RelabelingCollator | None:
    """The collator that maps dataset labels to ``class_ids`` (None: the labels are the class ids), checked
    against the base model's ``num_classes``."""
    if not class_ids:
        return None
    bad = [c for c in class_ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class_ids must lie in [0, {num_classes}), got {bad}")
    return RelabelingCollator(class_ids)


def train_lora(lora_args: LoraArguments, data_args: Any, training_args: TrainingArguments,
               callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train a LoRA adapter on the base pipeline's transformer and write it; returns the adapter folder.

    ``data_args`` is a :class:`~sphere_ar_hf.training.data.DataArguments`: images (encoded on the fly by the
    pipeline's frozen VAE, at its resolution) or a latent cache made with the same VAE. Labels are the base
    model's class ids, or are mapped to them by ``lora_args.class_ids``. ``callbacks`` go to the trainer. The
    adapter goes to ``lora_args.adapter_output_dir`` (default ``<output_dir>/adapter``).
    """
    from ..pipeline_sphere_ar import SphereARPipeline

    out = Path(lora_args.adapter_output_dir or Path(training_args.output_dir) / "adapter")
    inputs = [lora_args.pretrained_model, *data_inputs(data_args)]
    prepare_run(lora_args, training_args, data_args, out, kind="lora", inputs=inputs, parameter="adapter_output_dir")
    pipe = SphereARPipeline.from_pretrained(lora_args.pretrained_model)
    transformer, vae = pipe.transformer.float(), pipe.vae.float()
    num_classes = transformer.config.num_classes
    collator = relabeling_collator(lora_args.class_ids, num_classes)
    data = load_training_data(data_args, vae, training_args.seed, normalize=transformer.config.normalize_tokens,
                              num_classes=len(lora_args.class_ids) if lora_args.class_ids else num_classes)
    config = build_lora_config(lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout,
                               lora_args.lora_head, lora_args.train_class_embeddings, lora_args.target_modules,
                               num_classes)
    n_base = sum(p.numel() for p in transformer.parameters())
    peft_model = add_lora(transformer, config)
    n_adapter = adapter_parameter_count(peft_model)
    logger.info("LoRA adapter: %d values (%.2f%% of the transformer's %d)", n_adapter, 100 * n_adapter / n_base,
                n_base)
    trainer = LoraTrainer(model=peft_model, args=training_args, vae=vae, train_dataset=data.dataset,
                          data_collator=collator, callbacks=callbacks, base_model=lora_args.pretrained_model)
    return train_and_save(trainer, out, data_args=data_args, init=lora_args.pretrained_model, inputs=inputs)
