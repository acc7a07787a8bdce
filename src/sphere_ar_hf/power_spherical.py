"""The Power Spherical distribution (De Cao & Aziz, 2020) and the projection onto the latent sphere.

SphereAR's S-VAE posterior: a unimodal distribution on the unit sphere S^{m-1} with mean direction ``mu``
and concentration ``kappa``. Sampling is reparameterised (gradients reach ``mu`` and ``kappa``) and takes an
explicit ``torch.Generator``; the closed forms are evaluated in float64 (float32 on devices without it) so
that they stay finite for ``kappa`` up to 1e5 and dimensions up to 64, whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PowerSphericalDistribution", "l2_normalize", "project_to_sphere"]


def l2_normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Divide by the L2 norm of the last dimension (clamped at ``eps``)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def project_to_sphere(x: torch.Tensor, radius: float, eps: float = 1e-7) -> torch.Tensor:
    """Project tokens ``(..., d)`` onto the sphere of the given radius: SphereAR's key step."""
    return l2_normalize(x, eps) * radius


def _formula_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _GammaReparam(torch.autograd.Function):
    """Attach the implicit reparameterisation gradient d sample / d concentration to a Gamma(alpha, 1) draw."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(alpha, sample)
        return sample.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        alpha, sample = ctx.saved_tensors
        return grad * torch._standard_gamma_grad(alpha, sample), None


def sample_gamma(alpha: torch.Tensor, generator: torch.Generator | None = None, max_rounds: int = 32) -> torch.Tensor:
    """Reparameterised Gamma(alpha, 1) draws with an explicit generator (Marsaglia & Tsang, vectorised)."""
    a = alpha.detach()
    boost = a < 1.0
    a_eff = torch.where(boost, a + 1.0, a)
    d = a_eff - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = d.clone()
    pending = torch.ones_like(a, dtype=torch.bool)
    gdev = generator.device if generator is not None else a.device
    for _ in range(max_rounds):
        x = torch.randn(a.shape, generator=generator, device=gdev, dtype=a.dtype).to(a.device)
        u = torch.rand(a.shape, generator=generator, device=gdev, dtype=a.dtype).to(a.device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-30)))
        take = ok & pending
        out = torch.where(take, d * v, out)
        pending = pending & ~take
        if not bool(pending.any()):
            break
    if bool(boost.any()):
        u = torch.rand(a.shape, generator=generator, device=gdev, dtype=a.dtype).to(a.device)
        out = torch.where(boost, out * u.clamp(min=1e-30) ** (1.0 / a.clamp(min=1e-30)), out)
    out = out.clamp(min=torch.finfo(out.dtype).tiny)
    if alpha.requires_grad:
        return _GammaReparam.apply(alpha, out)
    return out


class PowerSphericalDistribution:
    """Power Spherical distribution on the unit sphere S^{m-1} of R^m.

    Args:
        mu: mean directions ``(..., m)``; normalised here.
        kappa: concentrations ``(...)``, >= 0.
    """

    parameter_names = ("mu", "kappa")

    def __init__(self, mu: torch.Tensor, kappa: torch.Tensor, eps: float = 1e-7):
        if mu.dim() < 1 or mu.shape[-1] < 2:
            raise ValueError(f"mu must have shape (..., m) with m >= 2, got {tuple(mu.shape)}")
        if kappa.shape != mu.shape[:-1]:
            raise ValueError(f"kappa must have shape {tuple(mu.shape[:-1])} (mu without its last dim), "
                             f"got {tuple(kappa.shape)}")
        self.eps = eps
        self.dtype = mu.dtype
        compute = torch.promote_types(mu.dtype, torch.float32)
        self.mu = l2_normalize(mu.to(compute), eps)
        self.kappa = kappa.to(compute).clamp(min=0.0)
        self.dim = mu.shape[-1]

    @classmethod
    def from_parameters(cls, parameters: dict[str, torch.Tensor]) -> PowerSphericalDistribution:
        return cls(parameters["mu"], parameters["kappa"])

    def parameters(self) -> dict[str, torch.Tensor]:
        """What a latent cache stores: ``mu`` ``(..., m)`` and ``kappa`` ``(...)``."""
        return {"mu": self.mu, "kappa": self.kappa}

    @property
    def alpha(self) -> torch.Tensor:
        return self.kappa + 0.5 * (self.dim - 1)

    @property
    def beta(self) -> float:
        return 0.5 * (self.dim - 1)

    def _f(self) -> tuple[torch.Tensor, float]:
        """kappa and beta in the dtype used for the closed forms."""
        return self.kappa.to(_formula_dtype(self.kappa.device)), self.beta

    def _log_normalizer(self, kappa: torch.Tensor, beta: float) -> torch.Tensor:
        alpha = kappa + beta
        return (
            -(alpha + beta) * math.log(2.0)
            - beta * math.log(math.pi)
            - torch.lgamma(alpha)
            + torch.lgamma(alpha + beta)
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of unit vectors ``x`` (..., m) w.r.t. the uniform surface measure."""
        kappa, beta = self._f()
        dot = (self.mu * x.to(self.mu.dtype)).sum(-1).to(kappa.dtype).clamp(-1.0, 1.0)
        return (self._log_normalizer(kappa, beta) + kappa * torch.log1p(dot)).to(self.kappa.dtype)

    def entropy(self) -> torch.Tensor:
        """Differential entropy, per distribution."""
        kappa, beta = self._f()
        alpha = kappa + beta
        digamma_gap = torch.digamma(alpha) - torch.digamma(alpha + beta)
        h = -(self._log_normalizer(kappa, beta) + kappa * (math.log(2.0) + digamma_gap))
        return h.to(self.kappa.dtype)

    def kl(self) -> torch.Tensor:
        """KL divergence to the uniform distribution on the sphere, per distribution (per token)."""
        kappa, _ = self._f()
        m = self.dim
        log_area = math.log(2.0) + 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m)
        return (log_area - self.entropy().to(kappa.dtype)).to(self.kappa.dtype)

    kl_to_uniform = kl

    def mean_cosine(self) -> torch.Tensor:
        """E[<mu, x>] = (alpha - beta) / (alpha + beta) in closed form."""
        alpha = self.alpha
        return (alpha - self.beta) / (alpha + self.beta)

    def mode(self) -> torch.Tensor:
        """The mode: ``mu`` itself."""
        return self.mu.to(self.dtype)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw per distribution: unit vectors ``(..., m)``."""
        mu, kappa = self.mu, self.kappa
        beta = torch.full_like(kappa, self.beta)
        ga = sample_gamma(kappa + self.beta, generator)
        gb = sample_gamma(beta, generator)
        z = ga / (ga + gb)  # Beta(alpha, beta)
        t = (2.0 * z - 1.0).unsqueeze(-1)
        gdev = generator.device if generator is not None else mu.device
        v = torch.randn(mu.shape[:-1] + (self.dim - 1,), generator=generator, device=gdev, dtype=mu.dtype).to(mu.device)
        v = l2_normalize(v, self.eps)
        y = torch.cat([t, torch.sqrt((1.0 - t * t).clamp(min=0.0)) * v], dim=-1)
        # Householder reflection taking e1 to mu
        e1 = torch.zeros_like(mu)
        e1[..., 0] = 1.0
        u = e1 - mu
        unorm = u.norm(dim=-1, keepdim=True)
        u = u / unorm.clamp(min=self.eps)
        x = y - 2.0 * (y * u).sum(-1, keepdim=True) * u
        x = torch.where(unorm < 1e-6, y, x)
        return x.to(self.dtype)

    rsample = sample

    def __repr__(self) -> str:
        return f"PowerSphericalDistribution(dim={self.dim}, batch_shape={tuple(self.kappa.shape)})"
