"""What the S-VAE run shows: the reconstruction preview PNG, the startup summary, the trackers' config and the
running means of a logging window."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import atomic_write
from ..vae import SphereVAE
from .vae_arguments import VAETrainingArguments

__all__ = [
    "LogMeter",
    "save_preview",
    "startup_summary",
    "tracker_config",
]


@torch.no_grad()
def save_preview(vae: SphereVAE, images: torch.Tensor, path: str | os.PathLike,
                 autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Reconstruct ``images`` through the posterior mode and write a PNG (top row inputs, bottom row
    reconstructions) atomically. Returns the grid ``(3, H, W)`` in [0, 1]. Draws no random numbers."""
    from torchvision.utils import make_grid, save_image

    was_training = vae.training
    vae.eval()
    try:
        with autocast or contextlib.nullcontext():
            mode = vae.encode(images).latent_dist.mode()
            recon = vae.decode(mode).sample
    finally:
        vae.train(was_training)
    both = torch.cat([images.float(), recon.float()]).clamp(-1, 1) * 0.5 + 0.5
    grid = make_grid(both.cpu(), nrow=images.shape[0], padding=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        save_image(grid, f, format="PNG")
    return grid


def tracker_config(*arg_objects: Any) -> dict[str, Any]:
    """The fields of the argument dataclasses as one flat dict of scalars (others as strings), for the trackers."""
    config: dict[str, Any] = {}
    for obj in arg_objects:
        for key, value in asdict(obj).items():
            config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def startup_summary(vae: nn.Module, discriminator: nn.Module, dataset: Any, max_steps: int,
                     steps_per_epoch: int | None, start_step: int, micro_bs: int, accum: int, world: int,
                     args: VAETrainingArguments, report_to: str | None) -> str:
    """A few lines on what the S-VAE run does: parameters, data, steps, the effective batch, where files go."""
    vae_params = sum(p.numel() for p in vae.parameters())
    disc_params = sum(p.numel() for p in discriminator.parameters())
    try:
        examples = f"{len(dataset):,} images"
    except TypeError:
        examples = "streamed images"
    epochs = f" ({max_steps / steps_per_epoch:g} epochs of {steps_per_epoch:,} steps)" if steps_per_epoch else ""
    start = f", resuming at step {start_step:,}" if start_step else ""
    limit, every = args.checkpoints_total_limit, args.keep_checkpoints_every
    kept = (f"the newest {limit}" if limit and limit > 0 else "all") + (f" and every {every}-th step" if every else "")
    logs = str(Path(args.output_dir) / "logs") if report_to else "off (--report_to none)"
    return "\n".join([
        "S-VAE training",
        f"  parameters: S-VAE {vae_params:,}, discriminator {disc_params:,}",
        f"  data:       {examples} at {vae.config.image_size}px",
        f"  steps:      {max_steps:,} optimizer steps{epochs}{start}",
        f"  batch:      {micro_bs} per device x {world} process{'es' if world != 1 else ''} x {accum} accumulation "
        f"= {micro_bs * world * accum} per step",
        f"  output:     {args.output_dir} (checkpoints every {args.checkpointing_steps:,} steps, keep {kept}; "
        f"TensorBoard logs: {logs})",
    ])


class LogMeter:
    """Per-key running means of logged values over a logging window (keys may appear mid-window).

    Tensors are summed as detached tensors where they live (no host read, so no GPU stall, per step); Python
    numbers (the learning rate) stay Python numbers. :meth:`mean_tensor` gives the window's means as one tensor,
    read once per logging interval; :attr:`started` is when the window began (``time.time()``)."""

    def __init__(self) -> None:
        self.reset()

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        """Count one step and add its values to the window."""
        self.steps += 1
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean_tensor(self, device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor]:
        """The keys (sorted) and their means as one float32 tensor on ``device``."""
        keys = sorted(self.sums)
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float32).to(device).reshape(()) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float32).to(device)
        return keys, torch.stack(sums) / counts

    def means(self) -> dict[str, float]:
        """The window's means as Python numbers."""
        keys, values = self.mean_tensor()
        return dict(zip(keys, values.tolist()))

    def reset(self) -> None:
        """Start a new window, now."""
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.started = time.time()
