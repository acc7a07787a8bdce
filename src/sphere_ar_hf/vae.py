"""SphereVAE: the S-VAE of SphereAR, a CNN + ViT autoencoder with a Power Spherical posterior (or, for the paper's
ablation, a diagonal Gaussian one)."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .config_fields import VAE_ARCHITECTURE, VAEFields, check_fields
from .diagonal_gaussian import DiagonalGaussianDistribution
from .layers import RMSNorm, Rope2D, TransformerBlock, align_loaded, run_blocks, swiglu_hidden_size
from .loading import auto_dtype, load_strictly, require_safetensors, resolve_dtype, write_architecture
from .options import POSTERIORS
from .power_spherical import PowerSphericalDistribution, l2_normalize, project_to_sphere

__all__ = ["POSTERIOR_CLASSES", "SphereVAE", "SphereVAEEncoderOutput", "DecoderOutput", "posterior_tokens"]
# ModelMixin.save_pretrained's parameters, which the override keeps: a pipeline's save_pretrained passes
# variant, max_shard_size, ... only to a save method whose signature names them
SAVE_SIGNATURE = inspect.signature(ModelMixin.save_pretrained)

Posterior = PowerSphericalDistribution | DiagonalGaussianDistribution
POSTERIOR_CLASSES: dict[str, type[Posterior]] = {
    "power_spherical": PowerSphericalDistribution, "gaussian": DiagonalGaussianDistribution}


def posterior_tokens(z: torch.Tensor, posterior: str, radius: float, normalize: bool) -> torch.Tensor:
    """AR tokens from posterior draws ``z``: on the sphere of ``radius`` when ``normalize`` or when the posterior is
    the Power Spherical (its draws are unit directions, scaled here), else the Gaussian draws themselves."""
    return project_to_sphere(z, radius) if normalize or posterior == "power_spherical" else z


class _NoEmptyFloat32Warning(logging.Filter):
    """diffusers' ``ModelMixin.to(dtype)`` warns that modules "should be kept in float32: []" on every cast, even
    when there are none (as here); drop that empty warning, keep every other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32Warning())


@dataclass
class SphereVAEEncoderOutput(BaseOutput):
    """``latent_dist``: the posterior, one per patch token: Power Spherical over unit directions (default), or a
    diagonal Gaussian (``posterior="gaussian"``)."""

    latent_dist: Posterior


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class DownBlock(nn.Module):
    """Residual 2x downsampling block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class UpBlock(nn.Module):
    """Residual 2x upsampling block followed by a second residual conv pair."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        self.norm3, self.conv3 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm4, self.conv4 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        x = self.shortcut(x) + h
        h = self.conv3(F.silu(self.norm3(x)))
        return x + self.conv4(F.silu(self.norm4(h)))


class ViT(nn.Module):
    """Register tokens + bidirectional transformer blocks over the patch tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, num_registers: int, grid: int, eps: float, theta: float):
        super().__init__()
        self.num_registers = num_registers
        self.register_tokens = nn.Parameter(torch.zeros(num_registers, dim))
        self.layers = nn.ModuleList(
            TransformerBlock(dim, num_heads, swiglu_hidden_size(dim), causal=False, eps=eps) for _ in range(depth)
        )
        self.rope = Rope2D(dim // num_heads, grid, num_registers, theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reg = self.register_tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([reg, x], dim=1)
        x = run_blocks(self.layers, x, self.rope.get(x.device))
        return x[:, self.num_registers:]


class SphereVAE(ModelMixin, ConfigMixin):
    """Hyperspherical VAE: images ``(B, 3, H, W)`` in [-1, 1] <-> tokens ``(B, (H/p)^2, latent_dim)`` of norm sqrt(d).

    The encoder is a residual CNN (one 2x downsampling per stage) followed by a ViT with register tokens; its
    output gives a Power Spherical posterior per patch (direction ``mu``, concentration ``kappa = softplus + 1``).
    The decoder mirrors it. Sizes are all in the config; the defaults are the official 75M S-VAE. A new instance
    has the official initialisation (:meth:`initialize_weights`).

    The baselines of the paper's ablation are options: ``posterior="gaussian"`` gives a diagonal Gaussian posterior
    (``quant_proj`` predicts a mean and a log-variance per dimension; KL to N(0, I)), and
    ``normalize_decoder_input`` (default True) projects every decoder input onto the radius-sqrt(d) sphere, in
    :meth:`decode` and so in :meth:`forward`. The Power Spherical posterior lives on the sphere, so it needs it.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "DownBlock", "UpBlock"]
    config_fields = VAEFields  # the type and range of each config field (checked at load)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``ModelMixin.save_pretrained``, with the architecture recorded in the weights' metadata (checked against
        the config when the folder loads: ``loading.check_architecture``). Safetensors only, as transformers writes
        them: ``safe_serialization=False`` (a pickle, which can run code where it loads) is a ``ValueError``."""
        saving = SAVE_SIGNATURE.bind(self, save_directory, *args, **kwargs).arguments
        require_safetensors(saving.get("safe_serialization", True), "SphereVAE")
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_architecture(saving, self.config, VAE_ARCHITECTURE)
        return out

    save_pretrained.__signature__ = SAVE_SIGNATURE

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``ModelMixin.from_pretrained``, strict (a missing, unexpected or mis-shaped weight is a ``ValueError``:
        :func:`.loading.load_strictly`), with ``dtype`` names such as ``"bf16"`` and ``"auto"`` (the stored dtype)
        understood and the CPU weights in aligned memory (see ``layers.align_tensors_``)."""
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        if dtype == "auto":
            path = args[0] if args else kwargs["pretrained_model_name_or_path"]
            dtype = auto_dtype(path, kwargs, "diffusion_pytorch_model.safetensors")
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        return align_loaded(load_strictly(cls, super().from_pretrained, args, kwargs))

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 16,
        image_size: int = 256,
        patch_size: int = 16,
        z_channels: int = 512,
        cnn_channels: tuple[int, ...] = (64, 64, 128, 256, 512),
        encoder_layers: int = 6,
        decoder_layers: int = 12,
        num_register_tokens: int = 4,
        num_attention_heads: int | None = None,
        in_channels: int = 3,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        posterior: str = "power_spherical",
        normalize_decoder_input: bool = True,
    ):
        super().__init__()
        check_fields(VAEFields, {k: v for k, v in locals().items() if k not in ("self", "__class__")})
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {', '.join(map(repr, POSTERIORS))}, got {posterior!r}")
        if not isinstance(normalize_decoder_input, bool):
            raise TypeError(f"normalize_decoder_input must be a bool, got {type(normalize_decoder_input).__name__}")
        if posterior == "power_spherical" and not normalize_decoder_input:
            raise ValueError("the Power Spherical posterior lies on the sphere: normalize_decoder_input=False needs "
                             "posterior='gaussian'")
        cnn_channels = tuple(cnn_channels)
        if 2 ** (len(cnn_channels) - 1) != patch_size:
            raise ValueError(f"patch_size {patch_size} needs {int(math.log2(patch_size)) + 1} CNN channel stages "
                             f"(one 2x downsampling each), got cnn_channels={list(cnn_channels)}")
        if cnn_channels[-1] != z_channels:
            raise ValueError(f"the last CNN stage must have z_channels={z_channels} channels, got {cnn_channels[-1]}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        heads = num_attention_heads or max(1, z_channels // 64)
        grid = image_size // patch_size
        self.grid_size, self.num_tokens = grid, grid * grid
        self.use_slicing = False  # decode one image at a time (enable_slicing)
        vit = dict(dim=z_channels, num_heads=heads, num_registers=num_register_tokens, grid=grid, eps=rms_norm_eps,
                   theta=rope_theta)
        # encoder
        self.encoder_conv_in = nn.Conv2d(in_channels, cnn_channels[0], 3, padding=1, bias=False)
        self.down_blocks = nn.ModuleList(DownBlock(a, b) for a, b in zip(cnn_channels[:-1], cnn_channels[1:]))
        self.encoder_vit = ViT(depth=encoder_layers, **vit)
        self.encoder_norm = RMSNorm(z_channels, eps=rms_norm_eps)
        self.encoder_out = nn.Linear(z_channels, z_channels, bias=False)
        # a direction and a concentration, or a mean and a log-variance per dimension
        self.quant_proj = nn.Linear(z_channels, latent_dim + 1 if posterior == "power_spherical" else 2 * latent_dim)
        # decoder
        self.post_quant_proj = nn.Linear(latent_dim, z_channels, bias=False)
        self.decoder_conv_in = nn.Conv2d(z_channels, z_channels, 3, padding=1, bias=False)
        self.decoder_vit = ViT(depth=decoder_layers, **vit)
        rev = cnn_channels[::-1]
        self.up_blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(rev[:-1], rev[1:]))
        self.decoder_norm_out = nn.GroupNorm(16, rev[-1], eps=1e-6)
        self.decoder_conv_out = nn.Conv2d(rev[-1], in_channels, 3, padding=1, bias=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official S-VAE initialisation (called by ``__init__``): linear weights N(0, 0.02) and zero biases,
        register tokens N(0, 0.02), then PyTorch's default init again for ``quant_proj``, ``post_quant_proj`` and
        ``encoder_out``; convolutions and norms keep PyTorch's defaults. Draws from the global RNG (seed it first).
        ``from_pretrained`` skips it (diffusers disables ``torch.nn.init`` while it builds the model)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for vit in (self.encoder_vit, self.decoder_vit):
            nn.init.normal_(vit.register_tokens, 0.0, 0.02)
        for module in (self.quant_proj, self.post_quant_proj, self.encoder_out):
            module.reset_parameters()

    def decode_bytes_per_image(self) -> int:
        """About the peak activation memory :meth:`decode` needs per image: a few maps of its largest upsampling
        stage (channels x resolution^2) and of its ViT (tokens x width, the attention scores per head)."""
        c, el = self.config, self.post_quant_proj.weight.dtype.itemsize
        rev = tuple(c.cnn_channels)[::-1]
        stages = max(cout * (self.grid_size * 2 ** (j + 1)) ** 2 for j, cout in enumerate(rev[1:]))
        tokens = self.num_tokens + c.num_register_tokens
        heads = c.num_attention_heads or max(1, c.z_channels // 64)
        vit = 8 * tokens * c.z_channels + 2 * tokens**2 * heads
        return 4 * stages * el + vit * el

    def enable_slicing(self) -> None:
        """Decode a batch one image at a time (diffusers' ``AutoencoderKL.enable_slicing``): the decoder's
        activations then take :meth:`decode_bytes_per_image` once instead of once per image, for larger sampling
        batches on a smaller GPU. An image's pixels may then differ from a batched decode by float rounding."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        """Decode a batch in one pass again (the default)."""
        self.use_slicing = False

    @property
    def latent_radius(self) -> float:
        return math.sqrt(self.config.latent_dim)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Project latents ``(..., latent_dim)`` onto the sphere of radius sqrt(latent_dim)."""
        return project_to_sphere(latents, self.latent_radius)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (batch, 3, H, W), got {type(images).__name__}")
        c, s = self.config.in_channels, self.config.image_size
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"images must have shape (batch, {c}, {s}, {s}), got {tuple(images.shape)}")

    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> SphereVAEEncoderOutput | tuple:
        """Encode images in [-1, 1] into the per-token posterior (Power Spherical, or diagonal Gaussian)."""
        self._check_images(images)
        x = self.encoder_conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        x = x.flatten(2).transpose(1, 2)  # (B, L, C) raster order
        x = self.encoder_out(self.encoder_norm(self.encoder_vit(x)))
        h = self.quant_proj(x).float()
        if self.config.posterior == "gaussian":
            dist = DiagonalGaussianDistribution(*h.chunk(2, dim=-1))
        else:
            dist = PowerSphericalDistribution(l2_normalize(h[..., :-1]), F.softplus(h[..., -1]) + 1.0)
        return SphereVAEEncoderOutput(latent_dist=dist) if return_dict else (dist,)

    @apply_forward_hook
    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode tokens ``(B, L, latent_dim)`` into images in about [-1, 1]; the tokens are first projected onto the
        radius-sqrt(d) sphere when ``normalize_decoder_input`` (the default)."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor (batch, tokens, latent_dim), got {type(latents).__name__}")
        L, d = self.num_tokens, self.config.latent_dim
        if latents.dim() != 3 or latents.shape[1] != L or latents.shape[2] != d:
            raise ValueError(f"latents must have shape (batch, {L}, {d}) (tokens of a {self.config.image_size}px image,"
                             f" latent_dim {d}), got {tuple(latents.shape)}")
        if self.use_slicing and latents.shape[0] > 1:
            x = torch.cat([self._decode_tokens(z) for z in latents.split(1)])
        else:
            x = self._decode_tokens(latents)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def _decode_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder on checked tokens ``(B, L, latent_dim)``, in one pass."""
        if self.config.normalize_decoder_input:
            latents = self.normalize(latents)
        x = self.post_quant_proj(latents.to(self.post_quant_proj.weight.dtype))
        g = self.grid_size
        x = x.transpose(1, 2).unflatten(2, (g, g))
        x = self.decoder_conv_in(x).flatten(2).transpose(1, 2)
        x = self.decoder_vit(x)
        x = x.transpose(1, 2).unflatten(2, (g, g))
        for block in self.up_blocks:
            x = block(x)
        return self.decoder_conv_out(F.silu(self.decoder_norm_out(x)))

    def forward(self, images: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                return_dict: bool = True) -> DecoderOutput | tuple:
        """Reconstruct images through a posterior sample (or its mode)."""
        dist = self.encode(images).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)

    def tokens(self, z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """AR tokens from posterior draws ``z`` (:func:`posterior_tokens`): projected onto the radius-sqrt(d) sphere
        when ``normalize`` (an AR model's ``normalize_tokens``) or the posterior is spherical."""
        return posterior_tokens(z, self.config.posterior, self.latent_radius, normalize)
