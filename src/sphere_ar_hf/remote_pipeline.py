"""The pipeline of a remote-code folder (:func:`.remote_code.write_remote_code`): ``model_index.json`` names it.

diffusers copies beside the module it loads only the modules that one imports itself (not theirs), so this module
imports every module of the package that the pipeline needs: a remote-code folder carries exactly these, unchanged.
"""

from __future__ import annotations

import os

from .config_fields import check_fields  # noqa: F401  (imported for diffusers, see the docstring)
from .configuration_sphere_ar import SphereARConfig
from .diagonal_gaussian import DiagonalGaussianDistribution  # noqa: F401  (imported for diffusers, see below)
from .fast_sampling import FastTokenSampler  # noqa: F401
from .labels import resolve_label_ids  # noqa: F401  (imported for diffusers, see above)
from .layers import TransformerBlock  # noqa: F401
from .loading import resolve_dtype  # noqa: F401
from .modeling_sphere_ar import SphereARTransformer
from .official_checkpoint import official_components  # noqa: F401
from .options import CFG_SCHEDULES  # noqa: F401
from .pipeline_sphere_ar import SphereARPipeline as _SphereARPipeline
from .power_spherical import project_to_sphere  # noqa: F401
from .remote_code import write_remote_code
from .scheduling_sphere_ar import SphereARScheduler
from .single_file import load_single_file  # noqa: F401
from .thin_products import ThinProducts  # noqa: F401
from .vae import SphereVAE

__all__ = ["SphereARConfig", "SphereARPipeline", "SphereARScheduler", "SphereARTransformer", "SphereVAE"]


class SphereARPipeline(_SphereARPipeline):
    """:class:`.pipeline_sphere_ar.SphereARPipeline` whose ``save_pretrained`` also writes the remote code (the module
    files this class was loaded from), so that the saved folder loads the same way again."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub would upload the folder before its remote code is written: save it, then "
                             "upload it (huggingface_hub.upload_folder)")
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
