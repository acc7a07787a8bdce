"""Training the S-VAE (SphereVAE + PatchGAN) with ``accelerate``: the run and its optimizer step.

``train_vae`` is the whole run (``examples/train_vae.py`` only parses arguments): set up accelerate, build the
models (:mod:`.vae_models`) and the data, resume, train epoch after epoch (logging, previews, evaluations and
checkpoints along the way), then save the S-VAE and its discriminator. One optimizer step is the official one:
the VAE step on L1 + LPIPS + KL + adversarial loss, then the discriminator step on the same reconstructions
(detached, computed before the VAE update). Defaults are the official S-VAE recipe (:mod:`.vae_arguments`; the
README's command: 100 epochs, global batch 256, lr 1e-4 constant, AdamW betas (0.9, 0.95), weight decay 0.05 on
>= 2-D tensors, gradient clipping 1.0, bf16, discriminator from step 20000).

Checkpoints are ``accelerator.save_state`` folders written under a temporary name and renamed into place with a
completion marker (:mod:`.vae_checkpoints`), so that ``--resume_from_checkpoint latest`` never picks a
half-written one. A resumed run continues bit for bit (same device count and batch geometry): the posterior
samples take a generator seeded from ``(seed, step, micro-batch, rank)``, the data order and augmentation are
functions of ``(seed, epoch)``, and the global RNG (LPIPS dropout) is restored by ``load_state``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..loading import refuse_non_finite
from ..utils import atomic_write, check_output_folder, remove_staged_folders, write_folder_atomically
from ..vae import SphereVAE
from .argument_checks import check_arguments, check_input_path
from .checkpoints import resolve_resume_checkpoint
from .data import DataArguments, build_image_dataset, collate_images
from .device_setup import check_one_job, process_group_kwargs, resolve_mixed_precision
from .latent_cache import data_inputs
from .losses import PatchGANDiscriminator, SphereVAELoss
from .optimization import official_param_groups
from .reconstruction_evaluation import ReconstructionEvaluation, first_pixel_values
from .schedules import official_learning_rate
from .vae_arguments import DEFAULT_KL_WEIGHTS, VAEModelArguments, VAETrainingArguments, kl_weight
from .vae_checkpoints import (
    ResumableDistributedSampler,
    TrainState,
    accelerate_state_folder,
    process_positions,
    save_checkpoint_atomically,
)
from .vae_models import PairedDiscriminator, VAEWithPosterior, build_discriminator, build_vae, posterior_generator
from .vae_reporting import LogMeter, save_preview, startup_summary, tracker_config

__all__ = [
    "train_vae",
    # defined in .vae_arguments and .vae_reporting; importable from here too (examples/train_digits.py,
    # training/__init__.py, tests/test_ablation.py, tests/test_gpu_traps.py)
    "DEFAULT_KL_WEIGHTS",
    "LogMeter",
    "VAEModelArguments",
    "VAETrainingArguments",
    "kl_weight",
]

logger = logging.getLogger(__name__)


@dataclass
class _Setup:
    """What every stage of the run reads: accelerate, the arguments, the batch geometry and the output folders."""

    accelerator: Any
    model_args: VAEModelArguments
    args: VAETrainingArguments
    data_args: DataArguments
    output_dir: Path
    report_to: str | None
    micro_bs: int  # images per device and micro-batch
    accum: int  # micro-batches per optimizer step
    inputs: list[str | None]  # what the final folders may not replace
    finals: dict[str, Path]  # "vae" and "discriminator": where the trained models go


@dataclass
class _Models:
    """The trained modules (wrapped for DDP and prepared by accelerate), their loss and their optimizers."""

    vae: SphereVAE
    discriminator: PatchGANDiscriminator
    model: nn.Module  # VAEWithPosterior(vae), prepared
    paired: nn.Module  # PairedDiscriminator(discriminator), prepared
    disc_inner: nn.Module  # the discriminator inside the prepared ``paired``
    loss_fn: SphereVAELoss
    opt_g: Any
    opt_d: Any


@dataclass
class _Data:
    """The training images, their order and length, and the fixed images of the preview and the evaluation."""

    dataset: Any
    sampler: ResumableDistributedSampler | None  # None for a streamed dataset
    steps_per_epoch: int | None  # None for a streamed dataset
    max_steps: int
    preview: torch.Tensor | None  # main process only
    evaluation: ReconstructionEvaluation | None  # main process only, when on


def train_vae(model_args: VAEModelArguments, training_args: VAETrainingArguments,
              data_args: DataArguments) -> Path:
    """Train the S-VAE and its discriminator; returns the saved ``output_dir/vae`` folder."""
    setup = _set_up(model_args, training_args, data_args)
    models = _build_models(setup)
    data = _build_data(setup)
    state = _resume(setup.accelerator, setup.args, setup.output_dir, setup.accum, data.evaluation)
    _start_reporting(setup, models, data, state)
    last_saved = _train_epochs(setup, models, data, state)
    return _save_final(setup, models, state, last_saved)


def _check_run_arguments(model_args: VAEModelArguments, args: VAETrainingArguments, data_args: DataArguments) -> None:
    """Refuse, before anything starts, arguments the S-VAE run cannot use."""
    check_arguments(model_args, args, data_args)
    for flag in ("pretrained_vae", "vae_config"):
        check_input_path(f"--{flag}", getattr(model_args, flag))
    if args.mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"--mixed_precision {args.mixed_precision!r}: expected 'auto', 'no' or 'bf16'")
    if data_args.latent_cache:
        raise ValueError("the S-VAE trains on images; drop --latent_cache")


def _set_up(model_args: VAEModelArguments, args: VAETrainingArguments, data_args: DataArguments) -> _Setup:
    """Start accelerate and logging, fix the batch geometry, refuse final folders that would replace an input, and
    (main process) prepare ``output_dir`` with ``training_args.json``."""
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import ProjectConfiguration

    _check_run_arguments(model_args, args, data_args)
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in ("none", "", None) else args.report_to
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        kwargs_handlers=process_group_kwargs(args.ddp_timeout),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                        if accelerator.is_main_process else logging.WARNING)
    device, world = accelerator.device, accelerator.num_processes
    check_one_job(accelerator.distributed_type != DistributedType.NO, "ACCELERATE_USE_CPU=true")
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    per_step = world * args.gradient_accumulation_steps
    if args.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {args.global_batch_size} must be divisible by processes "
                         f"({world}) x gradient_accumulation_steps ({args.gradient_accumulation_steps})")
    inputs = [model_args.pretrained_vae, *data_inputs(data_args)]
    finals = {"vae": output_dir / "vae", "discriminator": output_dir / "discriminator"}
    for final in finals.values():  # the final folders may replace only earlier ones; refuse before training
        check_output_folder(final, True, kind="model", inputs=inputs, option="--output_dir")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_staged_folders(output_dir, "checkpoint-*")  # left by a killed run
        with atomic_write(output_dir / "training_args.json", "w") as f:
            json.dump({"model": asdict(model_args), "training": asdict(args), "data": asdict(data_args)}, f, indent=2)
    return _Setup(accelerator, model_args, args, data_args, output_dir, report_to,
                  micro_bs=args.global_batch_size // per_step, accum=args.gradient_accumulation_steps,
                  inputs=inputs, finals=finals)


def _build_models(setup: _Setup) -> _Models:
    """The S-VAE (initialised from ``--seed``), the discriminator, the loss and the two AdamW optimizers (official
    parameter groups), prepared by accelerate; then each process's global RNG (LPIPS dropout) is seeded."""
    from accelerate.utils import set_seed

    accelerator, args, model_args = setup.accelerator, setup.args, setup.model_args
    device = accelerator.device
    set_seed(args.seed)
    vae = build_vae(model_args, setup.data_args.resolution)
    if model_args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    discriminator = build_discriminator(model_args)
    loss_fn = SphereVAELoss(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, kl_weight=kl_weight(args, vae), disc_weight=args.disc_weight,
        disc_start=args.disc_start, disc_loss=args.disc_loss, gen_loss=args.gen_loss,
        lpips_pretrained_backbone=not args.lpips_random_backbone, lpips_dropout=args.lpips_dropout,
    ).to(device)
    model, paired = VAEWithPosterior(vae), PairedDiscriminator(discriminator)
    model.train()
    paired.train()
    loss_fn.train()
    adam = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    if device.type == "cuda":
        adam["fused"] = True
    opt_g = torch.optim.AdamW(official_param_groups(model, args.weight_decay), **adam)
    opt_d = torch.optim.AdamW(official_param_groups(paired, args.weight_decay), **adam)
    model, paired, opt_g, opt_d = accelerator.prepare(model, paired, opt_g, opt_d)
    disc_inner: nn.Module = accelerator.unwrap_model(paired).discriminator
    set_seed(args.seed, device_specific=True)  # per-process global RNG (LPIPS dropout)
    return _Models(vae, discriminator, model, paired, disc_inner, loss_fn, opt_g, opt_d)


def _build_data(setup: _Setup) -> _Data:
    """The training dataset, its sampler (map-style) and length in steps, and the fixed images of the preview and
    of the reconstruction evaluation (main process)."""
    accelerator, args = setup.accelerator, setup.args
    world, rank = accelerator.num_processes, accelerator.process_index
    dataset = build_image_dataset(setup.data_args, seed=args.seed, rank=rank, world_size=world)
    sampler = None
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if args.max_train_steps is None:
            raise ValueError("a streamed dataset has no known length: set --max_train_steps")
        steps_per_epoch = None
    else:
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        steps_per_epoch = sampler.num_samples // setup.micro_bs // setup.accum
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    preview = first_pixel_values(dataset, args.num_validation_images) if accelerator.is_main_process else None
    evaluation = _reconstruction_evaluation(dataset, args, setup.output_dir, accelerator.device) if (
        accelerator.is_main_process) else None
    return _Data(dataset, sampler, steps_per_epoch, max_steps, preview, evaluation)


def _start_reporting(setup: _Setup, models: _Models, data: _Data, state: TrainState) -> None:
    """Start the trackers (the arguments as their config) and print the startup summary (main process)."""
    accelerator = setup.accelerator
    if setup.report_to:
        accelerator.init_trackers(setup.args.tracker_project_name,
                                  config=tracker_config(setup.model_args, setup.args, setup.data_args))
    if accelerator.is_main_process:
        print(startup_summary(models.vae, models.discriminator, data.dataset, data.max_steps, data.steps_per_epoch,
                              state.global_step, setup.micro_bs, setup.accum, accelerator.num_processes, setup.args,
                              setup.report_to), file=sys.stderr, flush=True)


def _train_epochs(setup: _Setup, models: _Models, data: _Data, state: TrainState) -> int:
    """Train from ``state`` to ``data.max_steps``, epoch after epoch (an incomplete accumulation group at an epoch's
    end is dropped), with the logging, checkpoints, previews and evaluations of :func:`_after_step`. Returns the
    step of the last checkpoint saved (-1: none, in a fresh run)."""
    from tqdm.auto import tqdm

    accelerator, args, m = setup.accelerator, setup.args, models
    last_saved = state.global_step if state.global_step else -1
    progress = tqdm(total=data.max_steps, initial=state.global_step, desc="S-VAE", unit="step", dynamic_ncols=True,
                    disable=args.disable_tqdm or not accelerator.is_main_process)
    meter = LogMeter()
    while state.global_step < data.max_steps:
        batches = _epoch_batches(setup, data, state)
        while state.global_step < data.max_steps:
            micro = list(itertools.islice(batches, setup.accum))
            if len(micro) < setup.accum:  # end of the epoch
                if state.micro_batches_in_epoch == 0:
                    raise RuntimeError("the dataset yielded no complete batch in an epoch")
                state.epoch += 1
                state.micro_batches_in_epoch = 0
                break
            logs = _train_step(accelerator, m.model, m.paired, m.disc_inner, m.loss_fn, m.opt_g, m.opt_d, micro,
                               state, args, data.max_steps)
            state.global_step += 1
            state.micro_batches_in_epoch += setup.accum
            meter.add(logs)
            progress.update(1)
            if _after_step(setup, models, data, state, meter, progress):
                last_saved = state.global_step
    progress.close()
    return last_saved


def _epoch_batches(setup: _Setup, data: _Data, state: TrainState) -> Iterator[dict[str, torch.Tensor] | None]:
    """The micro-batches of ``state.epoch`` from the resume position ``state.micro_batches_in_epoch`` on: the
    sampler starts there, a stream skips the batches before it."""
    args = setup.args
    data.dataset.set_epoch(state.epoch)
    if data.sampler is not None:
        data.sampler.set_epoch(state.epoch)
        data.sampler.set_start_index(state.micro_batches_in_epoch * setup.micro_bs)
    loader = DataLoader(data.dataset, batch_size=setup.micro_bs, sampler=data.sampler,
                        num_workers=args.dataloader_num_workers, collate_fn=collate_images, drop_last=True,
                        pin_memory=setup.accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed + state.epoch))
    batches = iter(loader)
    if data.sampler is None and state.micro_batches_in_epoch:
        logger.info("skipping %d streamed batches to the resume position", state.micro_batches_in_epoch)
        for _ in itertools.islice(batches, state.micro_batches_in_epoch):
            pass
    return batches


def _after_step(setup: _Setup, models: _Models, data: _Data, state: TrainState, meter: LogMeter,
                progress: Any) -> bool:
    """What the step just taken is due: log the window's means, save a checkpoint, write a preview, evaluate (each
    every N steps and at the last). Returns whether a checkpoint was saved."""
    accelerator, args, step, last = setup.accelerator, setup.args, state.global_step, data.max_steps
    if step % args.logging_steps == 0 or step == last:
        means = _log(accelerator, meter, step, time.time() - meter.started)
        progress.set_postfix({k: f"{means[k]:.4f}" for k in ("loss", "recon_loss") if k in means}, refresh=False)
        meter.reset()
    checkpoint = step % args.checkpointing_steps == 0 or step == last
    if checkpoint:
        _save_checkpoint(setup, state)
    if accelerator.is_main_process and data.preview is not None and (step % args.validation_steps == 0 or step == last):
        _write_preview(accelerator, models.model, data.preview, setup.output_dir / "previews" / f"step_{step:07d}.png",
                       step)
    if data.evaluation is not None and (step % args.eval_steps == 0 or step == last):
        _evaluate(accelerator, models.model, data.evaluation, step, state.epoch)
    return checkpoint


def _save_checkpoint(setup: _Setup, state: TrainState) -> None:
    """``checkpoint-<step>`` of the whole state (with the epoch and every process's data position in its marker),
    rotated as the arguments say."""
    args = setup.args
    extra = {"epoch": state.epoch, "train_state": state.state_dict(),
             "process_positions": process_positions(setup.accelerator, state)}
    save_checkpoint_atomically(setup.accelerator, setup.output_dir, state.global_step, extra=extra,
                               total_limit=args.checkpoints_total_limit, keep_every=args.keep_checkpoints_every)


def _save_final(setup: _Setup, models: _Models, state: TrainState, last_saved: int) -> Path:
    """Checkpoint the last step unless just done, refuse non-finite weights, write ``vae/`` and ``discriminator/``
    atomically (main process) and end the trackers; returns the ``vae/`` folder."""
    accelerator = setup.accelerator
    if last_saved != state.global_step:
        _save_checkpoint(setup, state)
    accelerator.wait_for_everyone()
    vae_dir = setup.finals["vae"]
    refuse_non_finite(accelerator.unwrap_model(models.model).vae, "S-VAE")
    if accelerator.is_main_process:
        final_vae = accelerator.unwrap_model(models.model).vae
        written = {"vae": final_vae, "discriminator": models.disc_inner}
        for name, module in written.items():
            write_folder_atomically(setup.finals[name], module.save_pretrained, overwrite=True, kind="model",
                                    inputs=setup.inputs, option="--output_dir")
        logger.info("saved the S-VAE to %s", vae_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return vae_dir


def _train_step(accelerator: Any, model: nn.Module, paired: nn.Module, disc_inner: nn.Module,
                loss_fn: SphereVAELoss, opt_g: Any, opt_d: Any, micro: list[dict[str, torch.Tensor] | None],
                state: TrainState, args: VAETrainingArguments, max_steps: int) -> dict[str, Any]:
    """One official optimizer step (VAE, then discriminator) over ``len(micro)`` accumulated micro-batches."""
    device, accum = accelerator.device, len(micro)
    step = state.global_step + 1  # 1-based, as the official ``global_step`` of the adversarial weight
    lr = official_learning_rate(state.global_step, max_steps, args.learning_rate, args.min_lr, args.lr_warmup_steps,
                                args.lr_decay_start)
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    adv_on = loss_fn.adversarial_weight(step) > 0
    logs: dict[str, Any] = {}

    def add(values: dict[str, Any]) -> None:
        for k, v in values.items():
            logs[k] = logs.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) / accum

    opt_g.zero_grad(set_to_none=True)
    disc_inner.requires_grad_(False)  # the generator's adversarial term trains only the VAE
    cached = []
    for i, batch in enumerate(micro):
        if batch is None:
            raise RuntimeError("every image of a batch was undecodable; check the dataset")
        images = batch["pixel_values"].to(device, non_blocking=True)
        sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                gen = posterior_generator(args.seed, state.global_step, i, accelerator.process_index, device)
                recon, kl, spread = model(images, gen)
                out = loss_fn.generator_loss(images, recon, kl, step, disc_inner if adv_on else None)
            accelerator.backward(out.loss / accum)
        add({**out.logs(), **spread})
        cached.append((images, recon.detach()))
    disc_inner.requires_grad_(True)
    if args.max_grad_norm > 0:
        logs["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).detach().float()
    opt_g.step()

    opt_d.zero_grad(set_to_none=True)
    if adv_on:
        for i, (images, recon) in enumerate(cached):
            sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(paired)
            with sync:
                with accelerator.autocast():
                    logits_real, logits_fake = paired(images, recon)
                    d_loss = loss_fn.discriminator_loss(logits_real, logits_fake, step)
                accelerator.backward(d_loss / accum)
            add({"disc_loss": d_loss, "logits_real": logits_real.detach().float().mean(),
                 "logits_fake": logits_fake.detach().float().mean()})
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(paired.parameters(), args.max_grad_norm)
    else:
        # The official code backpropagates 0 * loss here: zero gradients, yet AdamW still steps (weight decay,
        # step count). Same result without running the discriminator.
        for p in paired.parameters():
            p.grad = torch.zeros_like(p)
        add({"disc_loss": 0.0})
    opt_d.step()
    logs["lr"] = lr
    return logs


def _log(accelerator: Any, meter: LogMeter, step: int, seconds: float) -> dict[str, float]:
    """Log the window's means (averaged over processes) to the trackers and the logger; returns them."""
    keys, local = meter.mean_tensor(accelerator.device)  # the same keys on every process (all take the same steps)
    values = accelerator.reduce(local, reduction="mean")
    logs = {f"train/{k}": float(v) for k, v in zip(keys, values.tolist())}  # the window's one host read
    logs["train/steps_per_sec"] = meter.steps / max(seconds, 1e-9)
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        logger.info("step %d: %s", step, ", ".join(f"{k[6:]} {v:.4f}" for k, v in logs.items()))
    return {k[6:]: v for k, v in logs.items()}


def _write_preview(accelerator: Any, model: nn.Module, images: torch.Tensor, path: Path, step: int) -> None:
    vae = accelerator.unwrap_model(model).vae
    grid = save_preview(vae, images.to(accelerator.device), path, accelerator.autocast())
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("previews/input_vs_reconstruction", grid, step)


def _reconstruction_evaluation(dataset: Any, args: VAETrainingArguments, output_dir: Path, device: torch.device
                               ) -> ReconstructionEvaluation | None:
    """The reconstruction evaluation of ``--eval_images`` / ``--eval_steps`` (main process), or ``None`` when off."""
    if args.eval_steps < 0:
        raise ValueError(f"--eval_steps {args.eval_steps}: expected an integer >= 0 (0: off)")
    if not args.eval_images and not args.eval_steps:
        return None
    if not (args.eval_images and args.eval_steps):
        raise ValueError(f"--eval_steps {args.eval_steps} and --eval_images {args.eval_images}: set both (> 0) or "
                         "neither")
    return ReconstructionEvaluation(dataset, args.eval_images, args.eval_features, output_dir / "eval",
                                    args.eval_inception_weights, "cuda" if device.type == "cuda" else "cpu")


def _evaluate(accelerator: Any, model: nn.Module, evaluation: ReconstructionEvaluation, step: int,
              epoch: int) -> None:
    vae = accelerator.unwrap_model(model).vae
    record, grid = evaluation(vae, step, epoch, accelerator.autocast)
    accelerator.log({f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch", "num_gen", "num_ref")
                     and isinstance(v, (int, float))}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("eval/originals_over_reconstructions", grid, step, dataformats="HWC")
    name = "frechet_distance" if "frechet_distance" in record else "fid"
    logger.info("reconstruction evaluation at step %d: %s %.4f over %d images (%.1f s)", step, name, record[name],
                record["num_images"], record["seconds"])


def _resume(accelerator: Any, args: VAETrainingArguments, output_dir: Path, accum: int,
            evaluation: ReconstructionEvaluation | None) -> TrainState:
    """The run's :class:`TrainState`, loaded with the whole state from ``--resume_from_checkpoint`` if any (the
    evaluations after that checkpoint are then made again)."""
    world = accelerator.num_processes
    state = TrainState(global_batch_size=args.global_batch_size, num_processes=world,
                       gradient_accumulation_steps=accum)
    path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if path is None:
        return state
    # before load_state: a checkpoint it refuses changes nothing
    state.load_checkpoint(path, accelerator.process_index, world)
    with accelerate_state_folder(path) as folder:
        accelerator.load_state(str(folder))
    saved = (state.global_batch_size, state.num_processes, state.gradient_accumulation_steps)
    if saved != (args.global_batch_size, world, accum):
        logger.warning("checkpoint geometry (global batch, processes, accumulation) %s differs from %s: the data "
                       "order after resuming differs from an uninterrupted run", saved, (args.global_batch_size, world,
                                                                                        accum))
        state.global_batch_size, state.num_processes, state.gradient_accumulation_steps = (
            args.global_batch_size, world, accum)
    logger.info("resumed from %s at step %d (epoch %d)", path, state.global_step, state.epoch)
    if evaluation is not None:
        evaluation.log.keep_until(state.global_step)
    return state
