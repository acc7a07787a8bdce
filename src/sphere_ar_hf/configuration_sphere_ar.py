"""SphereARConfig: the AR transformer's configuration, with the official B / L / H presets."""

from __future__ import annotations

import math
import numbers

from transformers import AutoConfig, PreTrainedConfig

from .config_fields import (
    ConfigFieldError,
    TransformerFields,
    check_config_file,
    check_dtype_name,
    check_fields,
    config_file_error,
)
from .layers import swiglu_hidden_size

__all__ = ["SphereARConfig", "PRESETS", "check_guidance_scale"]

FLOAT32_MAX = 3.4028234663852886e38  # the guided velocity is computed in float32


def check_guidance_scale(value: object) -> float:
    """A classifier-free guidance scale as a float: any real number (not a bool) that is finite in float32 (<= 1
    disables guidance). The one check of a guidance scale: the config's recommended value, the pipeline's
    argument, the CLI's ``--guidance-scale`` and the demo's slider all come here.

    Raises ``TypeError`` (not a real number) or ``ValueError`` (not finite in float32), one line naming
    ``guidance_scale``, the value and what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"guidance_scale must be a float, got {type(value).__name__}")
    try:
        scale = float(value)
    except OverflowError:  # an int beyond the float range
        scale, value = math.inf, "an integer beyond the float range"
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise ValueError(f"guidance_scale must be a finite float32 number (the guided velocity is computed in "
                         f"float32), got {value}")
    return scale

# official sizes (SphereAR/model.py); recommended guidance scales from the official sampling commands
PRESETS: dict[str, dict] = {
    "SphereAR-B": dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=12, head_hidden_size=768,
                       head_num_layers=6, head_num_adaln=2, guidance_scale=4.5),
    "SphereAR-L": dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16, head_hidden_size=1024,
                       head_num_layers=8, head_num_adaln=2, guidance_scale=4.6),
    "SphereAR-H": dict(hidden_size=1280, num_hidden_layers=40, num_attention_heads=20, head_hidden_size=1280,
                       head_num_layers=12, head_num_adaln=3, guidance_scale=4.5),
}


class SphereARConfig(PreTrainedConfig):
    """Configuration of :class:`SphereARTransformer`.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the causal trunk
            (``intermediate_size`` defaults to the official SwiGLU width).
        head_hidden_size, head_num_layers, head_num_adaln: the per-token diffusion MLP head; consecutive
            ``head_num_layers / head_num_adaln`` blocks share one adaLN projection.
        latent_dim, image_size, patch_size: the token grid ((image_size / patch_size)^2 tokens of latent_dim).
        num_classes, num_class_tokens: class conditioning; id ``num_classes`` is the null (unconditional) class.
        class_dropout_prob, diff_batch_mul: training (class dropout to the null class; head batch repetition).
        guidance_scale: the recommended classifier-free guidance scale for sampling.
        normalize_tokens: project every sampled token (after CFG) onto the radius-sqrt(d) sphere before it is fed
            back and decoded (SphereAR); ``False`` applies no projection (the ablation's Gaussian baselines). The
            trainers follow it too: with ``False`` a Gaussian S-VAE's draws are the training tokens as they are.
    """

    model_type = "sphere_ar"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        head_hidden_size: int = 768,
        head_num_layers: int = 6,
        head_num_adaln: int = 2,
        latent_dim: int = 16,
        image_size: int = 256,
        patch_size: int = 16,
        num_classes: int = 1000,
        num_class_tokens: int = 16,
        class_dropout_prob: float = 0.1,
        diff_batch_mul: int = 4,
        guidance_scale: float = 4.5,
        normalize_tokens: bool = True,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        check_fields(TransformerFields, {k: v for k, v in locals().items() if k not in ("self", "kwargs")})
        for key in ("dtype", "torch_dtype"):
            check_dtype_name(key, kwargs.get(key))
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or swiglu_hidden_size(hidden_size)
        self.head_hidden_size = head_hidden_size
        self.head_num_layers = head_num_layers
        self.head_num_adaln = head_num_adaln
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_class_tokens = num_class_tokens
        self.class_dropout_prob = class_dropout_prob
        self.diff_batch_mul = diff_batch_mul
        self.guidance_scale = guidance_scale
        self.normalize_tokens = normalize_tokens
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """How the sizes fit together (each field's type and range is checked first, in ``__init__``)."""
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ConfigFieldError(f"hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} "
                                   "must give an integer head dim divisible by 4 (2D RoPE)")
        if self.image_size % self.patch_size:
            raise ConfigFieldError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.head_num_layers % max(1, self.head_num_layers // self.head_num_adaln):
            raise ConfigFieldError(f"head_num_layers {self.head_num_layers} must be divisible into head_num_adaln "
                             f"{self.head_num_adaln} groups")
        try:  # the recommended scale must be one the pipeline takes (the schema checked it is a finite number)
            check_guidance_scale(self.guidance_scale)
        except ValueError as e:
            raise ConfigFieldError(str(e).replace("guidance_scale", "guidance_scale:", 1)) from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedConfig.from_pretrained``; a bad field names its file (``.../config.json: hidden_size: ...``)."""
        check_config_file(pretrained_model_name_or_path, kwargs.get("subfolder"), "config.json")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ConfigFieldError as e:
            raise config_file_error(e, pretrained_model_name_or_path, kwargs.get("subfolder"), "config.json") from None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> SphereARConfig:
        """``SphereARConfig.from_preset("SphereAR-B", image_size=256)``: the official sizes of B, L or H."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})


AutoConfig.register(SphereARConfig.model_type, SphereARConfig, exist_ok=True)
