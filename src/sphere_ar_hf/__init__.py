"""SphereAR (hyperspherical-latent autoregressive image generation) for the Hugging Face ecosystem."""

from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers looks these up to load our components)
from transformers import AutoConfig, AutoModel, PreTrainedModel  # noqa: F401

from .configuration_sphere_ar import PRESETS, SphereARConfig
from .convert import convert_official_checkpoint
from .labels import imagenet_id2label
from .modeling_sphere_ar import SphereARTransformer, SphereARTransformerOutput
from .pipeline_sphere_ar import SphereARPipeline
from .power_spherical import PowerSphericalDistribution, project_to_sphere
from .pretrained import bundled_model_path
from .scheduling_sphere_ar import SphereARScheduler
from .vae import SphereVAE

AutoConfig.register("sphere_ar", SphereARConfig, exist_ok=True)
AutoModel.register(SphereARConfig, SphereARTransformer, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "PowerSphericalDistribution",
    "SphereARConfig",
    "SphereARPipeline",
    "SphereARScheduler",
    "SphereARTransformer",
    "SphereARTransformerOutput",
    "SphereVAE",
    "bundled_model_path",
    "convert_official_checkpoint",
    "imagenet_id2label",
    "project_to_sphere",
]
