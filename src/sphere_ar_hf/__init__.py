"""SphereAR (hyperspherical-latent autoregressive image generation) for the Hugging Face ecosystem.

The public names load on first use (as diffusers' and transformers' own do), so that ``sphere-ar --help`` and the
modules that need no model start without importing torch, diffusers or transformers. Importing the configuration
or the model registers ``sphere_ar`` with transformers' ``AutoConfig`` / ``AutoModel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> the module (in this package) that defines it
_EXPORTS: dict[str, str] = {
    "PRESETS": "configuration_sphere_ar",
    "SphereARConfig": "configuration_sphere_ar",
    "convert_official_checkpoint": "convert",
    "imagenet_id2label": "labels",
    "SphereARTransformer": "modeling_sphere_ar",
    "SphereARTransformerOutput": "modeling_sphere_ar",
    "SphereARPipeline": "pipeline_sphere_ar",
    "PowerSphericalDistribution": "power_spherical",
    "project_to_sphere": "power_spherical",
    "bundled_model_path": "pretrained",
    "SphereARScheduler": "scheduling_sphere_ar",
    "SphereVAE": "vae",
}

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

if TYPE_CHECKING:
    from .configuration_sphere_ar import PRESETS, SphereARConfig
    from .convert import convert_official_checkpoint
    from .labels import imagenet_id2label
    from .modeling_sphere_ar import SphereARTransformer, SphereARTransformerOutput
    from .pipeline_sphere_ar import SphereARPipeline
    from .power_spherical import PowerSphericalDistribution, project_to_sphere
    from .pretrained import bundled_model_path
    from .scheduling_sphere_ar import SphereARScheduler
    from .vae import SphereVAE


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
