"""The S-VAE training objective: L1 reconstruction, LPIPS, KL to the uniform sphere and a PatchGAN hinge loss.

Defaults follow the official recipe (``train.py`` / ``gan/gan_loss.py`` of guolinke/SphereAR)::

    generator:      1.0 * L1 + 1.0 * LPIPS + 0.004 * KL(q || U(S^{d-1})) + w(step) * (-mean D(recon))
    discriminator:  w(step) * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(recon)))
    w(step) = 0.5 from optimizer step ``disc_start`` = 20000 on (1-based), 0 before

There is no adaptive ("last layer") weight: the official code uses the fixed ``disc_weight``.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "DISC_LOSSES",
    "GEN_LOSSES",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "SphereVAELoss",
    "VAELossOutput",
    "VGGWeightsUnavailableError",
    "adversarial_weight",
    "hinge_d_loss",
    "hinge_gen_loss",
    "non_saturating_d_loss",
    "non_saturating_gen_loss",
    "vanilla_d_loss",
    "vgg16_weights_path",
]


# ---------------------------------------------------------------------------------------------------------------
# adversarial losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss ``0.5 * (mean softplus(-real) + mean softplus(fake))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy discriminator loss (real -> 1, fake -> 0), halved.

    Note: the official function passes ``(ones, logits)`` to ``binary_cross_entropy_with_logits`` (input and
    target swapped); this is the standard form. Not part of the default recipe (hinge).
    """
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (real + fake)


def hinge_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss ``-mean(D(recon))`` (the official default)."""
    return -logits_fake.mean()


def non_saturating_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: BCE of ``D(recon)`` against 1 (standard argument order)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


DISC_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non-saturating": non_saturating_d_loss,
}
GEN_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_gen_loss,
    "non-saturating": non_saturating_gen_loss,
}
REC_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


def adversarial_weight(step: int, disc_start: int, disc_weight: float) -> float:
    """Weight of both adversarial terms at optimizer step ``step`` (1-based): 0 before ``disc_start``."""
    return 0.0 if step < disc_start else float(disc_weight)


# ---------------------------------------------------------------------------------------------------------------
# networks


VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


class VGGWeightsUnavailableError(FileNotFoundError):
    """LPIPS needs torchvision's VGG16 ImageNet weights, which are neither cached nor downloadable."""


def vgg16_weights_path() -> Path:
    """Where torchvision looks for (and downloads) the VGG16 weights LPIPS uses:
    ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth`` (``$TORCH_HOME/hub/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _vgg_hint(reason: str) -> str:
    return (f"LPIPS (the perceptual loss) needs torchvision's VGG16 weights, which could not be downloaded "
            f"({' '.join(reason.split())}): put {VGG16_URL} at {vgg16_weights_path()}, or pass --perceptual_weight 0 "
            "(no perceptual loss) or --lpips_random_backbone (testing only: a meaningless loss)")


class PerceptualLoss(nn.Module):
    """LPIPS (VGG16, v0.1) through the ``lpips`` package, on images in [-1, 1]; returns the batch mean.

    The 1x1 "linear" layers are the LPIPS v0.1 weights shipped inside the ``lpips`` package (the same file,
    md5 d507d734..., as the official ``vgg.pth``). The VGG16 backbone is torchvision's ImageNet weights, which
    torchvision downloads to ``$TORCH_HOME/hub/checkpoints`` on first use; ``pretrained_backbone=False`` keeps it
    random (offline tests only: the loss is then meaningless). All parameters are frozen.

    ``use_dropout=True`` keeps LPIPS's dropout (p=0.5) before each linear layer, active whenever this module is in
    training mode: the official loss module is put in training mode with the rest, so its LPIPS is stochastic
    during training. Call ``.eval()`` (or pass ``use_dropout=False``) for the deterministic metric.
    """

    def __init__(self, pretrained_backbone: bool = True, use_dropout: bool = True):
        super().__init__()
        import lpips

        if pretrained_backbone and _offline() and not vgg16_weights_path().is_file():
            raise VGGWeightsUnavailableError(_vgg_hint("not cached, and HF_HUB_OFFLINE is set"))
        try:
            self._build(lpips, pretrained_backbone)
        except (OSError, urllib.error.URLError, http.client.HTTPException, TimeoutError) as err:
            if not pretrained_backbone or isinstance(err, VGGWeightsUnavailableError):
                raise
            raise VGGWeightsUnavailableError(_vgg_hint(f"{type(err).__name__}: {err}")) from err
        if not use_dropout:
            for lin in self.lpips.lins:
                lin.model[0] = nn.Identity()
        self.lpips.requires_grad_(False)
        self.train(False)

    def _build(self, lpips: Any, pretrained_backbone: bool) -> None:
        with warnings.catch_warnings():  # lpips still uses torchvision's deprecated ``pretrained=`` argument
            warnings.simplefilter("ignore", UserWarning)
            # always built with dropout: the shipped weights are keyed ``lin<i>.model.1.weight`` (after the dropout)
            # and lpips loads them with strict=False, so ``use_dropout=False`` would silently keep random layers
            self.lpips = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=not pretrained_backbone,
                                     use_dropout=True, verbose=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(input, target).mean()


class PatchGANDiscriminator(ModelMixin, ConfigMixin):
    """The pix2pix / taming PatchGAN used by the official S-VAE training: ``num_layers`` stride-2 4x4 convolutions
    (BatchNorm + LeakyReLU(0.2) after all but the first), a stride-1 conv, and a 1-channel stride-1 output conv.

    Returns a logit map ``(B, 1, h, w)`` (30x30 for 256px inputs). Weights are initialised as the official code
    does (conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), BatchNorm biases 0), and the ``main.<i>`` module
    indices match its state dict.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(base_channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


# ---------------------------------------------------------------------------------------------------------------
# the combined objective


@dataclass
class VAELossOutput:
    """The generator (VAE) loss and its parts; ``gen_adv`` is already multiplied by ``adv_weight``."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    perceptual: torch.Tensor
    kl: torch.Tensor
    gen_adv: torch.Tensor
    adv_weight: float

    def logs(self) -> dict[str, torch.Tensor]:
        """Detached parts, keyed for logging."""
        return {"loss": self.loss.detach(), "recon_loss": self.reconstruction.detach(),
                "p_loss": self.perceptual.detach(), "kl_loss": self.kl.detach(), "gen_loss": self.gen_adv.detach()}


class SphereVAELoss(nn.Module):
    """The official S-VAE objective (see the module docstring) with every weight and loss type configurable.

    Holds the frozen LPIPS network only; the discriminator is trained separately and passed in.
    """

    def __init__(
        self,
        reconstruction_loss: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        kl_weight: float = 0.004,
        disc_weight: float = 0.5,
        disc_start: int = 20000,
        disc_loss: str = "hinge",
        gen_loss: str = "hinge",
        perceptual: nn.Module | None = None,
        lpips_pretrained_backbone: bool = True,
        lpips_dropout: bool = True,
    ):
        super().__init__()
        for name, value, table in (("reconstruction_loss", reconstruction_loss, REC_LOSSES),
                                   ("disc_loss", disc_loss, DISC_LOSSES), ("gen_loss", gen_loss, GEN_LOSSES)):
            if value not in table:
                raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
        self.rec_loss, self.d_loss, self.g_loss = REC_LOSSES[reconstruction_loss], DISC_LOSSES[disc_loss], \
            GEN_LOSSES[gen_loss]
        self.reconstruction_weight, self.perceptual_weight = reconstruction_weight, perceptual_weight
        self.kl_weight, self.disc_weight, self.disc_start = kl_weight, disc_weight, disc_start
        if perceptual is None and perceptual_weight > 0:
            perceptual = PerceptualLoss(lpips_pretrained_backbone, lpips_dropout)
        self.perceptual = perceptual

    def adversarial_weight(self, step: int) -> float:
        """``disc_weight`` from optimizer step ``disc_start`` (1-based) on, else 0."""
        return adversarial_weight(step, self.disc_start, self.disc_weight)

    def generator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor, kl: torch.Tensor, step: int,
                       discriminator: nn.Module | None = None) -> VAELossOutput:
        """The VAE's loss at optimizer step ``step`` (1-based).

        ``kl``: the mean per-token KL to the uniform sphere (``latent_dist.kl().mean()``). The discriminator is
        only run when its weight is non-zero (before ``disc_start`` its term is exactly zero, as in the official
        code, which multiplies it by 0); pass it with frozen parameters so only the VAE gets gradients.
        """
        rec = self.rec_loss(reconstructions.float(), images.float())
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual(images, reconstructions)
        else:
            p_loss = rec.new_zeros(())
        w = self.adversarial_weight(step)
        if w > 0:
            if discriminator is None:
                raise ValueError(f"step {step} >= disc_start {self.disc_start}: the adversarial term needs the "
                                 "discriminator")
            gen_adv = w * self.g_loss(discriminator(reconstructions).float())
        else:
            gen_adv = rec.new_zeros(())
        kl = kl.float()
        loss = self.reconstruction_weight * rec + self.perceptual_weight * p_loss + gen_adv + self.kl_weight * kl
        return VAELossOutput(loss=loss, reconstruction=rec, perceptual=p_loss, kl=kl, gen_adv=gen_adv, adv_weight=w)

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, step: int) -> torch.Tensor:
        """The discriminator's loss at optimizer step ``step`` (1-based), scaled by the adversarial weight."""
        return self.adversarial_weight(step) * self.d_loss(logits_real.float(), logits_fake.float())
