"""The diagonal Gaussian posterior of a conventional VAE: the baseline of the paper's ablation.

``SphereVAE(posterior="gaussian")`` encodes each token into ``N(mean, diag(exp(logvar)))`` with a KL to
``N(0, I)``; it has the interface of :class:`~sphere_ar_hf.power_spherical.PowerSphericalDistribution`
(``sample(generator)``, ``mode()``, ``kl()`` per token, ``parameters()`` / ``from_parameters``).
"""

from __future__ import annotations

import torch

__all__ = ["DiagonalGaussianDistribution"]

LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of diffusers' and LDM's DiagonalGaussianDistribution


class DiagonalGaussianDistribution:
    """``N(mean, diag(exp(logvar)))`` per token.

    Args:
        mean: ``(..., d)`` means.
        logvar: ``(..., d)`` log variances, clamped to [-30, 20].
    """

    parameter_names = ("mean", "logvar")

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.dim() < 1 or logvar.shape != mean.shape:
            raise ValueError(f"mean and logvar must have the same shape (..., d), got {tuple(mean.shape)} and "
                             f"{tuple(logvar.shape)}")
        self.dtype = mean.dtype
        compute = torch.promote_types(mean.dtype, torch.float32)
        self.mean = mean.to(compute)
        self.logvar = logvar.to(compute).clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.dim = mean.shape[-1]

    @classmethod
    def from_parameters(cls, parameters: dict[str, torch.Tensor]) -> DiagonalGaussianDistribution:
        return cls(parameters["mean"], parameters["logvar"])

    def parameters(self) -> dict[str, torch.Tensor]:
        """What a latent cache stores: ``mean`` and ``logvar``, both ``(..., d)``."""
        return {"mean": self.mean, "logvar": self.logvar}

    def kl(self) -> torch.Tensor:
        """KL divergence to ``N(0, I)``, summed over the ``d`` dimensions: one value per token."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(-1)

    def mode(self) -> torch.Tensor:
        return self.mean.to(self.dtype)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw per token, ``(..., d)``."""
        gdev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=gdev, dtype=self.mean.dtype)
        return (self.mean + self.std * eps.to(self.mean.device)).to(self.dtype)

    rsample = sample

    def __repr__(self) -> str:
        return f"DiagonalGaussianDistribution(dim={self.dim}, batch_shape={tuple(self.mean.shape[:-1])})"
