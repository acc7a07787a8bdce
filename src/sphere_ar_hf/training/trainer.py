"""Training the SphereAR transformer with ``transformers.Trainer``: the official recipe, crash-safe checkpoints.

* :class:`~.arguments.SphereARTrainingArguments`: ``TrainingArguments`` whose defaults are the official recipe
  (AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.05, 20k warm-up steps, cosine decay to 1e-5 from step 20k, grad
  clipping 1.0, EMA 0.9999, bf16 on GPU, 400 epochs, per-device batch 64 = global 512 on 8 GPUs, tensorboard).
* :class:`SphereARTrainer`: takes batches of sphere tokens (``latents``, e.g. from the latent cache) or images
  (``pixel_values``, encoded on the fly by a frozen SphereVAE with posterior sampling); the official weight-decay
  rule (:mod:`.optimization`); the official learning-rate formula as a ``LambdaLR``; every random draw of the
  loss from one ``torch.Generator`` per process that is checkpointed; an EMA (:mod:`.ema`); checkpoints that are
  marked complete only once every file is on disk (:class:`~.callbacks.CheckpointCompletionCallback`), so a run
  killed while saving never leaves a checkpoint that ``--resume_from_checkpoint latest`` would pick up.
* :func:`train_sphere_ar`: the whole run behind ``examples/train_sphere_ar.py`` (its setup, shared with the LoRA
  run, in :mod:`.run`); it ends by writing a complete pipeline folder (EMA weights, the VAE, the scheduler, the
  dataset's class names) atomically.

Why ``Trainer`` and not one accelerate loop shared with the S-VAE trainer: the AR step is a plain
``loss.backward()`` step, which is what ``Trainer`` runs, and ``Trainer`` gives this run every
``TrainingArguments`` flag (``torch_compile``, activation checkpointing, DeepSpeed/FSDP, loggers, evaluation)
for free. The S-VAE step (two models, two optimizers, the discriminator step on the VAE's reconstructions)
does not fit ``Trainer``'s one-model loop, so it keeps its own accelerate loop. Everything here goes through
``Trainer``'s public extension points (overridden public methods, constructor arguments and callbacks), none of
its underscore methods, so that it survives transformers releases.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.trainer_utils import HubStrategy

from ..configuration_sphere_ar import SphereARConfig
from ..loading import refuse_non_finite
from ..modeling_sphere_ar import SphereARTransformer
from ..vae import SphereVAE
from .arguments import ModelArguments, build_sphere_ar_config
from .callbacks import CheckpointCompletionCallback, DatasetEpochCallback, StartupSummaryCallback
from .checkpoints import resolve_resume_checkpoint
from .device_setup import check_ema_supported
from .ema import EMACallback, unwrap_module
from .latent_cache import LatentCacheDataset, data_inputs, load_vae
from .optimization import decay_parameter_names
from .run import load_training_data, prepare_run, train_and_save
from .sample_evaluation import SampleEvaluationCallback, SampleEvaluationSettings
from .schedules import OfficialLRLambda, OfficialLRScheduler

__all__ = [
    "SphereARTrainer",
    "collate_training_batch",
    "train_sphere_ar",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# batches


def collate_training_batch(items: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Stack dataset items (``latents`` or ``pixel_values``, ``class_labels``, anything else tensor-valued).

    ``None`` items (undecodable images) are dropped; a batch with none left is ``{}`` and the trainer then runs a
    zero-weight step so that every process still steps together.
    """
    if any(it is not None and "pixel_values" in it for it in items):
        from .data import collate_images

        out = collate_images(items)  # counts undecodable images
        if out is None:
            return {}
        extra = {k for it in items if it is not None for k in it} - set(out)
        kept = [it for it in items if it is not None]
        out.update({k: torch.stack([torch.as_tensor(it[k]) for it in kept]) for k in sorted(extra)})
        return out
    kept = [it for it in items if it is not None]
    if not kept:
        return {}
    return {k: torch.stack([torch.as_tensor(it[k]) for it in kept]) for k in kept[0]}


def _count(n: int, word: str) -> str:
    """``"1 class"``, ``"4 classes"``, ``"16 examples"``."""
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


class SphereARTrainer(Trainer):
    """``Trainer`` for :class:`SphereARTransformer` (see the module docstring).

    Only public ``Trainer`` extension points are used: ``compute_loss`` / ``training_step`` / ``evaluate``,
    ``get_decay_parameter_names`` and ``create_scheduler``, ``train`` (to resolve ``"latest"``) and callbacks
    (:class:`~.ema.EMACallback`, the dataset's ``set_epoch``, :class:`CheckpointCompletionCallback`). The
    trainer rotates checkpoints itself, counting only complete ones, so it keeps ``args.save_total_limit`` as
    :attr:`save_total_limit` and runs the Trainer on a copy of ``args`` without it. The Hub repository gets the
    final pipeline (:meth:`push_pipeline_to_hub`): ``push_to_hub`` needs ``hub_strategy="end"`` (the default
    of :class:`~.arguments.SphereARTrainingArguments`), since a pushed checkpoint would not have its completion
    marker yet.

    Args:
        model: the transformer to train.
        args: training arguments (:class:`~.arguments.SphereARTrainingArguments` for the recipe's extra settings).
        vae: the frozen S-VAE; needed for ``pixel_values`` batches and for :meth:`save_pipeline`.
        **kwargs: everything else ``transformers.Trainer`` takes (``train_dataset``, ``callbacks``, ...).
    """

    def __init__(self, model: SphereARTransformer, args: TrainingArguments, vae: SphereVAE | None = None,
                 train_dataset: Any = None, data_collator: Callable | None = None,
                 callbacks: list[TrainerCallback] | None = None, **kwargs):
        if args.push_to_hub and args.hub_strategy != HubStrategy.END:
            raise ValueError(f"push_to_hub with hub_strategy={args.hub_strategy.value!r}: the SphereAR trainer "
                             "pushes the final pipeline, not checkpoints; set hub_strategy='end'")
        if args.push_to_hub:  # the card's license is checked before any training (sphere-ar push's rule)
            from ..hub import check_license

            check_license(getattr(args, "hub_license", None), None, None)
        self.save_total_limit = args.save_total_limit
        self.keep_checkpoints_every = getattr(args, "keep_checkpoints_every", None)
        if args.save_total_limit is not None:
            args = copy.copy(args)  # the Trainer's own rotation would count the checkpoint being written
            args.save_total_limit = None
        callbacks = list(callbacks or [])
        ema_decay = float(getattr(args, "ema_decay", 0.0) or 0.0)
        check_ema_supported(args, ema_decay)
        self.ema_callback = EMACallback(ema_decay) if ema_decay > 0 else None
        if self.ema_callback is not None:
            callbacks.append(self.ema_callback)  # before the completion marker: writes ema.safetensors on save
        evaluation = SampleEvaluationSettings.from_training_args(args)
        if train_dataset is not None:
            callbacks.append(DatasetEpochCallback(train_dataset))
        callbacks.append(StartupSummaryCallback(self))
        callbacks.append(CheckpointCompletionCallback(self))
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         data_collator=data_collator or collate_training_batch, callbacks=callbacks, **kwargs)
        self.logging_dir = self._route_tensorboard()
        if evaluation is not None:  # after the EMA's update of the step (an earlier callback)
            self.add_callback(SampleEvaluationCallback(self, evaluation))
        # The loss is a per-batch mean over tokens and noise draws: the Trainer scales it for gradient
        # accumulation, and never counts items (batches have no "labels").
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.normalize_tokens = bool(getattr(model.config, "normalize_tokens", True))
        self.generator = torch.Generator(device=self.args.device)
        self.generator.manual_seed(self.args.seed * self.args.world_size + self.args.process_index)
        self._eval_generator = torch.Generator(device=self.args.device)
        self._official_lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.resumed_from: str | None = None

    # ---- logs and the startup summary ----------------------------------------------------------------------
    def _route_tensorboard(self) -> str:
        """Point the Trainer's TensorBoard callbacks at ``args.logging_dir`` (default ``<output_dir>/logs``, where
        the S-VAE trainer logs too) unless ``TENSORBOARD_LOGGING_DIR`` is set; returns that folder."""
        from transformers.integrations import TensorBoardCallback

        folder = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(self.args, "logging_dir", None) or str(
            Path(self.args.output_dir) / "logs")
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
                callback.logging_dir = os.path.expanduser(folder)
        return folder

    def startup_summary(self, state: TrainerState, train_dataloader: Any = None) -> str:
        """A few lines on what this run does: parameters, data, steps (and the epochs they make, as the Trainer
        counts them: optimizer steps over the steps of one pass of ``train_dataloader``), the effective batch,
        where files go."""
        model = unwrap_module(self.model)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = getattr(model, "config", None)
        args, world = self.args, self.args.world_size
        effective = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        try:
            examples = _count(len(self.train_dataset), "example")
        except TypeError:
            examples = "streamed"
        classes = f", {_count(config.num_classes, 'class')}" if config is not None else ""
        start = f", resuming at step {state.global_step:,}" if state.global_step else ""
        try:
            per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
            count = state.max_steps / per_epoch
            epochs = f" ({count:.3g} epoch{'' if count == 1 else 's'} of {_count(per_epoch, 'step')})"
        except TypeError:  # no dataloader, or a streamed one
            epochs = ""
        limit = self.save_total_limit
        kept = (f"the newest {limit}" if limit and limit > 0 else "all") + (
            f" and every {self.keep_checkpoints_every}-th step" if self.keep_checkpoints_every else "")
        lines = [
            "SphereAR training",
            f"  parameters: {total:,} ({trainable:,} trainable)",
            f"  data:       {examples}{classes}",
            f"  steps:      {state.max_steps:,} optimizer steps{epochs}{start}",
            f"  batch:      {args.per_device_train_batch_size} per device x {world} "
            f"process{'es' if world != 1 else ''} x {args.gradient_accumulation_steps} accumulation = {effective} "
            "per step",
            f"  output:     {args.output_dir} (checkpoints: keep {kept}; TensorBoard logs: {self.logging_dir})",
        ]
        return "\n".join(lines)

    # ---- loss ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """AR tokens of images in [-1, 1]: ``vae.tokens(vae.encode(x).latent_dist.sample(generator))``, projected
        onto the sphere unless the model's ``normalize_tokens`` is off and the posterior is Gaussian."""
        if self.vae is None:
            raise ValueError("this batch holds pixel_values but the trainer has no VAE: pass vae= (or train from a "
                             "latent cache)")
        device = pixel_values.device
        if self.vae.device != device:
            self.vae.to(device)
        dist = self.vae.encode(pixel_values.to(device, self.vae.dtype)).latent_dist
        return self.vae.tokens(dist.sample(generator).float(), normalize=self.normalize_tokens)

    def _dummy_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        c = unwrap_module(model).config
        latents = torch.zeros(1, c.num_image_tokens, c.latent_dim, device=self.args.device)
        latents[..., 0] = math.sqrt(c.latent_dim)
        return {"latents": latents, "class_labels": torch.full((1,), c.num_classes, device=self.args.device)}

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Flow-matching loss of a batch of ``latents`` or ``pixel_values`` (encoded here) and ``class_labels``."""
        generator = self.generator if model.training else self._eval_generator
        latents = inputs.get("latents")
        if latents is None:
            if "pixel_values" not in inputs:
                raise ValueError(f"a training batch needs 'latents' or 'pixel_values', got keys {sorted(inputs)}")
            latents = self.encode_images(inputs["pixel_values"], generator)
        latents, labels = latents.float(), inputs["class_labels"]
        # drawn here, outside the model: a generator inside forward splits a --torch_compile graph in five
        draws = unwrap_module(model).draw_training_inputs(latents, labels, generator)
        outputs = model(latents=latents, class_labels=labels, **draws)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        if not inputs:  # every image of the batch was undecodable: a zero-weight step keeps the processes in step
            logger.warning("empty batch (every image undecodable): running a zero-weight step")
            model.train()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, self._dummy_inputs(model)) * 0.0
            self.accelerator.backward(loss)
            return loss.detach()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self._eval_generator.manual_seed(self.args.seed)  # the same noise at every evaluation
        return super().evaluate(*args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Rough training FLOPs: 6 x parameters x image tokens."""
        labels = inputs.get("class_labels")
        if labels is None:
            return 0
        config = unwrap_module(self.model).config
        return 6 * unwrap_module(self.model).num_parameters() * labels.numel() * config.num_image_tokens

    # ---- optimizer and schedule ----------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The official rule (:func:`~.optimization.decay_parameter_names`): no decay on 1-d parameters and on the
        modules the model lists in ``_no_weight_decay_modules``; under PEFT that leaves the LoRA matrices."""
        return decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
                         ) -> torch.optim.lr_scheduler.LRScheduler:
        """The official schedule (:class:`~.schedules.OfficialLRScheduler`, rebuilt for every ``train`` call from
        the current arguments, also on resume), unless ``official_lr_schedule`` is off or a scheduler was given to
        the constructor."""
        if not getattr(self.args, "official_lr_schedule", False) or (
                self.lr_scheduler is not None and self.lr_scheduler is not self._official_lr_scheduler):
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        fn = OfficialLRLambda(num_training_steps, self.args.learning_rate, self.args.min_lr,
                              self.args.get_warmup_steps(num_training_steps), self.args.decay_start)
        self.lr_scheduler = self._official_lr_scheduler = OfficialLRScheduler(optimizer, fn)
        return self.lr_scheduler

    # ---- checkpoints and resume ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> Any:
        """``Trainer.train`` with ``resume_from_checkpoint="latest"`` (newest complete checkpoint, or a fresh start)."""
        folder = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        self.resumed_from = folder
        if self.ema_callback is not None:
            self.ema_callback.resume_from_checkpoint = folder
        if folder is not None:
            logger.info("resuming from %s", folder)
        return super().train(resume_from_checkpoint=folder, **kwargs)

    def on_checkpoint_written(self, folder: Path) -> None:
        """Called on every process once its files of a checkpoint are written, before the checkpoint is marked
        complete: a subclass may add files here (the tests stop a run at this point)."""

    # ---- final pipeline ------------------------------------------------------------------------------------
    def build_pipeline(self, id2label: dict[int, str] | None = None, scheduler: Any = None) -> Any:
        """A :class:`SphereARPipeline` of the current transformer (EMA weights after training), the VAE, a scheduler."""
        from ..pipeline_sphere_ar import SphereARPipeline
        from ..scheduling_sphere_ar import SphereARScheduler

        if self.vae is None:
            raise ValueError("build_pipeline needs the VAE: pass vae= to the trainer")
        transformer = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return SphereARPipeline(transformer=transformer, vae=self.vae, scheduler=scheduler or SphereARScheduler(),
                                id2label=id2label)

    def training_record(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the final save records about this run (``hub.TRAINING_INFO_KEY`` in ``transformer/config.json``,
        shown by ``sphere-ar push``'s card): ``data`` (:func:`~.run.training_data_record`) plus steps, epochs, the
        effective batch size, the peak learning rate and the date."""
        import datetime

        from .. import __version__

        args = self.args
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        return {**(data or {}), "global_step": int(self.state.global_step),
                "epochs": round(float(self.state.epoch or 0.0), 4),
                "effective_batch_size": int(args.per_device_train_batch_size * args.gradient_accumulation_steps
                                            * world),
                "learning_rate": float(args.learning_rate), "seed": int(args.seed),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "trainer": f"sphere-ar-hf {__version__} {type(self).__name__}"}

    def save_pipeline(self, output_dir: str | os.PathLike, id2label: dict[int, str] | None = None,
                      inputs: Sequence[str | os.PathLike | None] = (),
                      training_data: dict[str, Any] | None = None) -> Path:
        """Write the pipeline folder atomically (temporary folder, then rename) on the main process.

        An existing ``output_dir`` is replaced only if it is a pipeline folder that holds none of ``inputs`` (the
        paths the run read: ``utils.check_output_folder``). The transformer's config records the run
        (:meth:`training_record` of ``training_data``)."""
        from ..hub import TRAINING_INFO_KEY
        from ..utils import write_folder_atomically

        output_dir = Path(output_dir)
        refuse_non_finite(self.accelerator.unwrap_model(self.model), "transformer")
        if self.args.should_save:
            pipe = self.build_pipeline(id2label)
            setattr(pipe.transformer.config, TRAINING_INFO_KEY, self.training_record(training_data))
            write_folder_atomically(output_dir, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True),
                                    overwrite=True, kind="pipeline", inputs=inputs, option="output_dir")
            logger.info("wrote the pipeline to %s", output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir

    def push_pipeline_to_hub(self, folder: str | os.PathLike, commit_message: str = "End of training") -> str | None:
        """Upload a saved pipeline folder to ``args.hub_model_id`` through ``sphere-ar push``'s publisher
        (:func:`..hub.push_pipeline`: the model card that fits, with ``args.hub_license``, and the remote code);
        returns the repository's URL on the main process."""
        if not self.args.should_save:
            return None
        from ..hub import push_pipeline

        url = push_pipeline(folder, self.hub_repo_id(), license=getattr(self.args, "hub_license", None),
                            private=bool(self.args.hub_private_repo), commit_message=commit_message,
                            revision=self.args.hub_revision, token=self.args.hub_token)
        logger.info("pushed the pipeline to %s", url)
        return url

    def hub_repo_id(self) -> str:
        """The Hub repository the run's result goes to: ``hub_model_id``, else the output folder's name."""
        return self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def save_final(self, output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (),
                   training_data: dict[str, Any] | None = None, id2label: dict[int, str] | None = None) -> Path:
        """Write what the run makes (here the pipeline: :meth:`save_pipeline`; a subclass may write something
        else) to ``output_dir``; :func:`~.run.train_and_save` calls it once training is done."""
        return self.save_pipeline(output_dir, id2label, inputs=inputs, training_data=training_data)

    def push_final(self, folder: str | os.PathLike) -> str | None:
        """Upload what :meth:`save_final` wrote (here :meth:`push_pipeline_to_hub`)."""
        return self.push_pipeline_to_hub(folder)


# ---------------------------------------------------------------------------------------------------------------
# the whole run


def _load_transformer(path: str, config: SphereARConfig) -> SphereARTransformer:
    if (Path(path) / "transformer" / "config.json").is_file():
        model = SphereARTransformer.from_pretrained(path, subfolder="transformer")
    else:
        model = SphereARTransformer.from_pretrained(path)
    for key in ("num_image_tokens", "latent_dim", "num_classes"):
        if getattr(model.config, key) != getattr(config, key):
            raise ValueError(f"--pretrained_model {path}: {key} = {getattr(model.config, key)}, but the VAE/data "
                             f"need {getattr(config, key)}")
    model.config.class_dropout_prob = config.class_dropout_prob
    model.config.diff_batch_mul = config.diff_batch_mul
    return model


def train_sphere_ar(model_args: ModelArguments, data_args: Any, training_args: TrainingArguments,
                    callbacks: list[TrainerCallback] | None = None,
                    dataset_wrapper: Callable[[Any], Any] | None = None) -> Path:
    """Train a SphereAR transformer and write the pipeline folder; returns its path.

    Data: ``data_args.latent_cache`` (sphere tokens sampled from cached posteriors) or images (``DataArguments``),
    encoded on the fly by the VAE. ``dataset_wrapper`` may wrap the training dataset (e.g. to log what is read).
    The pipeline goes to ``training_args.pipeline_output_dir`` (default ``<output_dir>/pipeline``).
    """
    out = Path(getattr(training_args, "pipeline_output_dir", None) or Path(training_args.output_dir) / "pipeline")
    inputs = [model_args.pretrained_vae, model_args.pretrained_model, *data_inputs(data_args)]
    prepare_run(model_args, training_args, data_args, out, kind="pipeline", inputs=inputs,
                parameter="pipeline_output_dir", input_paths=("pretrained_vae", "config_file", "pretrained_model"))
    vae = load_vae(model_args.pretrained_vae).float()
    data = load_training_data(data_args, vae, training_args.seed)
    config = build_sphere_ar_config(model_args, vae, data.num_classes)
    if isinstance(data.dataset, LatentCacheDataset):  # a latent cache: its tokens follow the model's normalize_tokens
        data.dataset.normalize = config.normalize_tokens
    set_seed(training_args.seed)
    if model_args.pretrained_model:
        model = _load_transformer(model_args.pretrained_model, config)
    else:
        model = SphereARTransformer(config)
    dataset = dataset_wrapper(data.dataset) if dataset_wrapper is not None else data.dataset
    trainer = SphereARTrainer(model=model, args=training_args, vae=vae, train_dataset=dataset, callbacks=callbacks)
    return train_and_save(trainer, out, data_args=data_args, init=model_args.pretrained_model, inputs=inputs,
                          id2label=data.id2label)
