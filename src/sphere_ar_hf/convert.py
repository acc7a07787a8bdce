"""Convert official SphereAR checkpoints (``SphereAR_B.pt``, ``vae.pt``, ...) into a pipeline folder
(``sphere-ar convert``): the models of :func:`.official_checkpoint.official_components`, saved atomically as
safetensors.

The checkpoint is read with ``torch.load(weights_only=True)``: a pickle that would run code is refused before any
of it runs (:func:`.official_checkpoint.load_official_checkpoint`).
"""

from __future__ import annotations

import os

from .official_checkpoint import ConversionError, load_official_checkpoint, official_components
from .pipeline_sphere_ar import SphereARPipeline
from .scheduling_sphere_ar import SphereARScheduler
from .utils import check_output_folder, write_folder_atomically

__all__ = ["ConversionError", "convert_official_checkpoint", "load_official_checkpoint"]


def convert_official_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None,
                                vae_checkpoint: str | os.PathLike | None = None, use_ema: bool = True,
                                num_heads: int | None = None, vae_num_heads: int | None = None,
                                overwrite: bool = False, info: dict | None = None) -> SphereARPipeline:
    """Build a :class:`.SphereARPipeline` from official weights and, if ``output`` is given, save it there.

    ``checkpoint``, ``vae_checkpoint``, ``use_ema``, ``num_heads``, ``vae_num_heads`` and ``info``: as
    :func:`.official_checkpoint.official_components`. ``output`` is written atomically as safetensors. An existing
    non-empty folder needs ``overwrite``, and is replaced only if it is a pipeline folder that holds neither
    checkpoint (``utils.check_output_folder``).

    Every problem with the inputs raises :class:`.ConversionError` with a one-line message.
    """
    inputs = (checkpoint, vae_checkpoint)
    if output is not None:
        check_output_folder(output, overwrite, kind="pipeline", inputs=inputs)  # fail before the slow part
    transformer, vae, id2label = official_components(checkpoint, vae_checkpoint, use_ema, num_heads, vae_num_heads,
                                                     info)
    pipe = SphereARPipeline(transformer=transformer, vae=vae, scheduler=SphereARScheduler(), id2label=id2label)
    if output is not None:
        write_folder_atomically(output, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True),
                                overwrite=overwrite, kind="pipeline", inputs=inputs)
    return pipe
