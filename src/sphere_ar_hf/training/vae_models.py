"""The S-VAE run's modules: the SphereVAE and PatchGAN discriminator it trains, the wrappers through which DDP sees
each as one call, and the seeding of the posterior samples."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from ..power_spherical import PowerSphericalDistribution
from ..vae import SphereVAE
from .losses import PatchGANDiscriminator
from .vae_arguments import VAEModelArguments

__all__ = [
    "PairedDiscriminator",
    "VAEWithPosterior",
    "build_discriminator",
    "build_vae",
    "posterior_generator",
]

logger = logging.getLogger(__name__)


def build_vae(model_args: VAEModelArguments, image_size: int) -> SphereVAE:
    """A SphereVAE from ``pretrained_vae``, or ``vae_config`` + flags with the official initialisation."""
    sizes = {k: getattr(model_args, k) for k in ("latent_dim", "patch_size", "z_channels", "cnn_channels",
                                                 "encoder_layers", "decoder_layers", "num_register_tokens",
                                                 "num_attention_heads", "posterior", "normalize_decoder_input")}
    if model_args.pretrained_vae:
        from .latent_cache import load_vae

        vae = load_vae(model_args.pretrained_vae)
        given = {k: v for k, v in sizes.items() if v is not None}
        if given or model_args.vae_config:
            raise ValueError(f"--pretrained_vae fixes the architecture; drop {sorted(given) or ['--vae_config']}")
        if vae.config.image_size != image_size:
            raise ValueError(f"the pretrained VAE is for {vae.config.image_size}px images; set --resolution "
                             f"{vae.config.image_size} (got {image_size})")
        return vae
    config: dict[str, Any] = {}
    if model_args.vae_config:
        config = dict(SphereVAE.load_config(model_args.vae_config))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if config.get("image_size", image_size) != image_size:
            logger.warning("vae_config image_size %s replaced by the data resolution %d", config["image_size"],
                           image_size)
    config.update({k: v for k, v in sizes.items() if v is not None})
    config["image_size"] = image_size
    if "cnn_channels" in config:
        config["cnn_channels"] = tuple(config["cnn_channels"])
    return SphereVAE(**config)  # the official initialisation (SphereVAE.initialize_weights)


def build_discriminator(model_args: VAEModelArguments) -> PatchGANDiscriminator:
    """The PatchGAN discriminator of the model arguments (``--disc_channels``, ``--disc_layers``)."""
    return PatchGANDiscriminator(in_channels=3, base_channels=model_args.disc_channels,
                                 num_layers=model_args.disc_layers)


class VAEWithPosterior(nn.Module):
    """The trained module: encode, sample the posterior with ``generator``, decode (which projects onto the sphere
    when ``normalize_decoder_input``).

    One ``forward`` (so that DDP sees the whole graph); returns ``(reconstruction, mean per-token KL to the prior
    (the uniform sphere, or N(0, I)), a log of the posterior's spread)``: ``{"kappa": mean kappa}`` or
    ``{"posterior_std": mean standard deviation}``.
    """

    def __init__(self, vae: SphereVAE):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        dist = self.vae.encode(images).latent_dist
        recon = self.vae.decode(dist.sample(generator)).sample
        spread = {"kappa": dist.kappa.detach().mean()} if isinstance(dist, PowerSphericalDistribution) else \
            {"posterior_std": dist.std.detach().mean()}
        return recon, dist.kl().mean(), spread


class PairedDiscriminator(nn.Module):
    """Runs the discriminator on real and fake images separately (BatchNorm statistics per batch, as the
    official code) inside one ``forward``, so that DDP sees a single call."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


def posterior_generator(seed: int, step: int, micro_batch: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for one micro-batch's posterior sample, seeded from ``(seed, step, micro_batch, rank)``: the
    draws need no saved state and a resumed run repeats them exactly."""
    key = hashlib.sha256(f"sphere-vae/{seed}/{step}/{micro_batch}/{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
